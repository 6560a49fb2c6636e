"""The 'torch' backend: PIL decode + torchvision ops in DataLoader worker processes.

Each item is (epoch, slot, file): the worker decodes ``file`` (already the stand-in if the index
knew the slot's file was bad), applies the slot's view and returns which file it used. A file
that fails to decode here although the index passed it is replaced in the worker by walking
the same stand-in order the planner uses, so the batch is the one every backend produces.
"""
from __future__ import annotations

import signal
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .index import TORCH_ONLY, FileResolver, ImageIndex
from .plan import Planner
from .transforms import apply_view, apply_view_tensor, load_channels, load_rgb, turn
from .views import sample_views

__all__ = ["PretrainImageDataset", "TorchDataBackend"]


class PretrainImageDataset(Dataset):
    def __init__(self, index: ImageIndex, resolver: FileResolver, seed: int, size: int, scale, ratio,
                 hflip_prob: float, mean, std, in_chans: int = 3, vflip_prob: float = 0.0, rot90: bool = False,
                 value_range=None):
        self.paths = index.paths
        self.resolver = resolver
        self.seed, self.size = seed, size
        self.scale, self.ratio, self.hflip_prob = tuple(scale), tuple(ratio), hflip_prob
        self.mean, self.std = list(mean), list(std)
        self.in_chans = in_chans
        self.vflip_prob, self.rot90 = vflip_prob, rot90
        self.value_range = None if value_range is None else tuple(value_range)
        # 3 channels with the default scaling: the RGB path every backend shares; otherwise the bands as stored
        self.rgb = in_chans == 3 and value_range is None
        # arrays (.npy, TIFFs PIL cannot open) take the band reader even on the RGB path
        self.arrays = np.zeros(len(index), dtype=bool)
        self.arrays[[i for i, note in index.notes.items() if TORCH_ONLY in note]] = True

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Tuple[int, int, int]):
        epoch, slot, file = item
        failures: List[Tuple[int, str]] = []
        while True:
            try:
                rgb = self.rgb and not self.arrays[file]
                img = (load_rgb(self.paths[file]) if rgb else
                       load_channels(self.paths[file], self.in_chans, self.value_range))
                break
            except Exception as e:  # noqa: BLE001 - any decode failure: skip the file, count it
                reason = f"decode failed (PIL): {type(e).__name__}: {e}"
                failures.append((file, reason))
                self.resolver.mark_bad(file, reason)
                file = self.resolver.stand_in(file)
        w, h = (img.width, img.height) if rgb else (img.shape[-1], img.shape[-2])
        views = sample_views(self.seed, epoch, [slot], [w], [h], self.scale, self.ratio, self.hflip_prob,
                             self.vflip_prob, self.rot90)
        apply = apply_view if rgb else apply_view_tensor
        x = apply(img, views[0], self.size, self.mean, self.std)
        return turn(x, *views.turns(0)), file, failures


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: the training process handles them (finishes the step,
    saves a checkpoint) and needs its workers until then; Ctrl-C and SLURM signal every process of the job,
    workers included. Workers still exit when the training process does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(items):
    images = torch.stack([it[0] for it in items])
    files = np.array([it[1] for it in items], dtype=np.int64)
    failures = [f for it in items for f in it[2]]
    return images, files, failures


class TorchDataBackend:
    def __init__(self, planner: Planner, size: int, num_workers: int, pin_memory: bool, in_chans: int = 3):
        d = planner.data
        self.planner = planner
        self.dataset = PretrainImageDataset(planner.index, planner.resolver, planner.seed, size, d.crop_scale,
                                            d.crop_ratio, d.hflip_prob, d.mean, d.std, in_chans,
                                            d.vflip_prob, d.rot90, d.value_range)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def run(self, epoch: int, steps: Sequence[int]) -> Iterator[Tuple[int, torch.Tensor, np.ndarray]]:
        steps = list(steps)
        if not steps:
            return
        items = []
        for step in steps:  # views are drawn in the workers, from the decoded size
            slots = self.planner.slots(epoch, step)
            items += [(epoch, int(s), int(f)) for s, f in zip(slots, self.planner.resolver.resolve(slots))]
        # Views are seeded per sample, so the workers' base seed is irrelevant; a private generator keeps
        # the DataLoader from drawing it from the global RNG, which would shift the training RNG stream
        # (drop path) with the point where an epoch was entered and break resume equality.
        loader = DataLoader(self.dataset, batch_size=self.planner.batch_size, sampler=items,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
                            generator=torch.Generator(),
                            collate_fn=_collate, persistent_workers=False, worker_init_fn=_ignore_stop_signals,
                            prefetch_factor=4 if self.num_workers > 0 else None)
        for step, (images, files, failures) in zip(steps, loader):
            for file, reason in failures:  # workers found these: plan later steps without them
                self.planner.report_bad(file, reason)
            yield step, images, files

    def close(self) -> None:
        pass
