"""The loader interface the training engine consumes, whatever the backend.

    loader = PretrainLoader(cfg, rank=0, world_size=1, device=torch.device("cuda"), log_dir=out)
    for images, mask in loader.epoch(epoch, start_batch=0):
        ...  # images (B, 3, S, S) normalised, data.output_dtype, on device; mask (B, S/p, S/p) uint8 on device
    loader.stats()  # files skipped per epoch (undecodable ones, replaced by stand-ins)

Order and content are a function of (train.seed, epoch, rank, world size) and of which files are
bad: an epoch restarted at ``start_batch`` yields exactly the batches an uninterrupted epoch yields
from that step on, with every backend (plan.py, views.py). Batches are always full: a bad file's
slot reads a deterministic stand-in file (index.py).
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..config import Config
from ..errors import UserError
from ..masking import BatchMaskGenerator
from .files import list_images
from .index import BAD, CONVERT, TORCH_ONLY, ImageIndex, build_index, default_cache_dir
from .plan import Planner, epoch_order

__all__ = ["PretrainLoader", "epoch_order", "load_index", "check_usable"]

log = logging.getLogger("simmim_fast.data")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_index(cfg: Config, workers: Optional[int] = None, processes: bool = False, progress=None,
               paths: Optional[List[Path]] = None) -> ImageIndex:
    """The checked file index of cfg.data.path (from the cache for unchanged files); ``paths`` are its
    files when the caller has listed them already."""
    d = cfg.data
    paths = list_images(d.path, d.layout, cache_dir=d.cache_dir) if paths is None else paths
    root = Path(d.path).expanduser().resolve() if d.path is not None else Path(str(paths[0])).parent
    channels = band_channels(cfg)
    key = f"{root}|{d.layout}" + ("" if channels is None else f"|bands{channels}")
    index = build_index(paths, key, d.check, cache_dir=_cache_dir(cfg),
                        workers=max(1, d.num_workers if workers is None else workers), processes=processes,
                        progress=progress, channels=channels)
    index.restrict_min_side(d.min_image_side)
    return index


def band_channels(cfg: Config) -> Optional[int]:
    """None when files are read as 8-bit RGB (model.in_chans 3 and no data.value_range), else the number of
    bands every file must have (read as stored)."""
    return None if cfg.model.in_chans == 3 and cfg.data.value_range is None else cfg.model.in_chans


def check_usable(index: ImageIndex, cfg: Config) -> None:
    """Refuse a dataset of which more than data.max_skipped_fraction cannot be used (UserError naming a few
    files and the count): a wrong path or a folder of unreadable files, caught before training starts."""
    d = cfg.data
    bad = index.bad
    limit = d.max_skipped_fraction
    if len(bad) > limit * len(index):
        where = f"data.path = {d.path}" if d.path is not None else "the scikit-image sample photos"
        shown = "; ".join(f"{index.paths[i]} ({index.reasons[int(i)]})" for i in bad[:3])
        raise UserError(
            f"{len(bad)} of {len(index)} files in {where} cannot be used, more than data.max_skipped_fraction = "
            f"{limit}: {shown}{' ...' if len(bad) > 3 else ''}. Run `simmim-fast scan {d.path or ''}` for the full "
            f"list, fix or remove them, or raise data.max_skipped_fraction")


def _cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


class PretrainLoader:
    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 log_dir: Optional[str | Path] = None, paths: Optional[List[Path]] = None,
                 index: Optional[ImageIndex] = None):
        """``paths``: the dataset's files when the caller has listed them already (``list_images``);
        ``index``: their checked index when the caller has built it already (``load_index``)."""
        d, m = cfg.data, cfg.model
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise UserError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UserError(f"rank must be an int in [0, world_size = {world_size}), got {rank!r}")
        self.cfg = cfg
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if d.backend == "dali" and self.device.type != "cuda":
            raise UserError(f"data.backend 'dali' decodes on the GPU and needs a CUDA device, got {self.device}; "
                             f"use data.backend 'dali_cpu' or 'torch'")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device} requested but CUDA is not available")
        self.backend_name = d.backend
        self.batch_size = cfg.train.micro_batch_size
        self.seed = cfg.train.seed
        self.size = m.img_size
        self.dtype = _DTYPES[d.output_dtype]
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.masks = BatchMaskGenerator(m.img_size, cfg.mask.mask_patch_size, m.patch_size, cfg.mask.mask_ratio)
        self._epochs: Dict[int, Dict[str, Any]] = {}
        self.index: Optional[ImageIndex] = None
        self.planner: Optional[Planner] = None
        self.backend = None
        if d.backend == "synthetic":
            self.num_samples = d.synthetic_samples
            self.micro_batches_per_epoch = (self.num_samples // world_size) // self.batch_size
            self._check_steps(f"data.synthetic_samples = {d.synthetic_samples}")
            return
        if d.backend in ("dali", "dali_cpu"):
            torch_only = [f"model.in_chans = {m.in_chans}" if m.in_chans != 3 else "",
                          f"data.value_range = {list(d.value_range)}" if d.value_range is not None else "",
                          f"data.vflip_prob = {d.vflip_prob}" if d.vflip_prob > 0 else "",
                          "data.rot90 = true" if d.rot90 else ""]
            torch_only = [t for t in torch_only if t]
            if torch_only:
                raise UserError(f"data.backend '{d.backend}' decodes 8-bit RGB with crops and horizontal flips only; "
                                f"{', '.join(torch_only)} needs data.backend 'torch' (--set data.backend=torch)")
        if d.backend in ("dali", "dali_cpu"):
            from .dali_loader import import_dali
            import_dali()  # fail now, naming the missing package, not after the file check
        self.index = load_index(cfg, paths=paths) if index is None else index
        if d.backend in ("dali", "dali_cpu"):
            arrays = [i for i, note in self.index.notes.items() if TORCH_ONLY in note and self.index.status[i] != BAD]
            if arrays:
                raise UserError(f"{len(arrays)} files of data.path = {d.path} are arrays the DALI decoders cannot read "
                                f"(e.g. {self.index.paths[arrays[0]]}: {self.index.notes[arrays[0]]}); use data.backend "
                                f"'torch' (--set data.backend=torch)")
        self.num_samples = len(self.index)
        self.micro_batches_per_epoch = (self.num_samples // world_size) // self.batch_size
        self._check_steps(f"data.path = {d.path}")
        self._report_index()
        self.planner = Planner(self.index, d, self.seed, rank, world_size, self.batch_size)
        if d.backend == "torch":
            from .torch_loader import TorchDataBackend
            self.backend = TorchDataBackend(self.planner, self.size, d.num_workers,
                                            pin_memory=self.device.type == "cuda", in_chans=m.in_chans)
        else:
            from .dali_loader import DaliDataBackend
            self.backend = DaliDataBackend(self.planner, self.size, gpu=d.backend == "dali", device=self.device,
                                       num_threads=d.num_workers, prefetch=d.dali_prefetch,
                                       hw_decoder_load=d.dali_hw_decoder_load,
                                       output_fp16=d.output_dtype == "float16", cache_dir=_cache_dir(cfg))

    def _check_steps(self, source: str) -> None:
        if self.micro_batches_per_epoch == 0:
            raise UserError(
                f"dataset has {self.num_samples} images, fewer than one batch per rank "
                f"(train.micro_batch_size {self.batch_size} x world size {self.world_size}); "
                f"lower train.micro_batch_size or add images ({source})")

    def _report_index(self) -> None:
        idx, d = self.index, self.cfg.data
        bad = idx.bad
        where = f"data.path = {d.path}" if d.path is not None else "the scikit-image sample photos"
        src = (f"{idx.checked} checked ({d.check}) in {idx.seconds:.1f} s, {len(idx) - idx.checked} from the cache"
               if idx.checked else "all from the cache")
        log.info("data: %d files in %s (%s); %d converted to RGB on the way, %d unusable", len(idx), where, src,
                 len(idx.notes), len(bad))
        if len(bad):
            reasons = Counter(idx.reasons[int(i)].split(":")[0].split(" (")[0] for i in bad)
            log.warning("data: %d of %d files cannot be used and are replaced by stand-ins each epoch: %s%s",
                        len(bad), len(idx), "; ".join(f"{n} {r}" for r, n in reasons.most_common()),
                        f" (names in {self.log_dir / 'data_bad_files.tsv'})" if self.log_dir is not None else
                        "; `simmim-fast scan` lists them")
            if self.log_dir is not None and self.rank == 0:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / "data_bad_files.tsv", "w") as f:
                    f.write("path\treason\n")
                    for i in bad:
                        f.write(f"{idx.paths[i]}\t{idx.reasons[int(i)]}\n")
        check_usable(idx, self.cfg)

    # ---------------------------------------------------------------------------------------
    def _generator(self, epoch: int, step: int, stream: int) -> torch.Generator:
        g = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        g.manual_seed(int(np.random.default_rng([self.seed, epoch, step, self.rank, stream]).integers(2 ** 62)))
        return g

    def mask_rng(self, epoch: int, step: int) -> torch.Generator:
        """The generator of step ``step``'s masks: seeded by (seed, epoch, step, rank), on the device."""
        return self._generator(epoch, step, 0x3A5C)

    def plan(self, epoch: int, step: int):
        """What step ``step`` of ``epoch`` holds on this rank (slots, files read, views); None for 'synthetic'."""
        return None if self.planner is None else self.planner.plan(epoch, step)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= self.micro_batches_per_epoch:
            raise UserError(f"start_batch must be an int in [0, micro_batches_per_epoch = {self.micro_batches_per_epoch}], "
                             f"got {start_batch!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserError(f"epoch must be a non-negative int, got {epoch!r}")
        return self._epoch(epoch, start_batch)

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        record = self._epochs[epoch] = {"skipped": 0, "files": [], "start_batch": start_batch, "batches": 0}
        steps = range(start_batch, self.micro_batches_per_epoch)
        batches = (self._synthetic(epoch, steps) if self.backend is None else self.backend.run(epoch, steps))
        try:
            with contextlib.closing(batches):
                for step, images, files in batches:
                    self._record(record, epoch, step, files)
                    images = images.to(self.device, non_blocking=True)
                    if images.dtype != self.dtype:
                        images = images.to(self.dtype)
                    g = self.mask_rng(epoch, step)
                    mask = self.masks(images.shape[0], device=g.device, generator=g).to(self.device, non_blocking=True)
                    record["batches"] += 1
                    yield images, mask
        finally:
            self._summarise(epoch, record)

    def _synthetic(self, epoch: int, steps) -> Iterator[Tuple[int, torch.Tensor, np.ndarray]]:
        shape = (self.batch_size, 3, self.size, self.size)
        for step in steps:
            g = self._generator(epoch, step, 0x1A6E)
            yield step, torch.randn(shape, device=g.device, generator=g), None

    def _record(self, record: Dict[str, Any], epoch: int, step: int, files: Optional[np.ndarray]) -> None:
        if files is None:
            return
        slots = self.planner.slots(epoch, step)
        for j in np.flatnonzero(files != slots):
            slot, file = int(slots[j]), int(files[j])
            record["skipped"] += 1
            record["files"].append({"batch": step, "path": str(self.index.paths[slot]),
                                    "reason": self.planner.resolver.reasons.get(slot, "unusable"),
                                    "stand_in": str(self.index.paths[file])})

    def _summarise(self, epoch: int, record: Dict[str, Any]) -> None:
        if self.backend is None:
            return
        done = record["start_batch"] + record["batches"]
        span = (f"batches {record['start_batch']}-{done - 1}" if done < self.micro_batches_per_epoch or record["start_batch"]
                else "whole epoch")
        if not record["skipped"]:
            log.debug("data: epoch %d rank %d (%s): no files skipped", epoch, self.rank, span)
            return
        where = ""
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"data_skipped_rank{self.rank}.tsv"
            new = not path.exists()
            with open(path, "a") as f:
                if new:
                    f.write("epoch\tbatch\tpath\treason\tstand_in\n")
                for r in record["files"]:
                    f.write(f"{epoch}\t{r['batch']}\t{r['path']}\t{r['reason']}\t{r['stand_in']}\n")
            where = f"; names in {path}"
        log.warning("data: epoch %d rank %d (%s): %d undecodable files skipped, their slots read stand-ins%s",
                    epoch, self.rank, span, record["skipped"], where)

    def stats(self) -> Dict[str, Any]:
        """Skipped files per epoch on this rank: {"epochs": {epoch: {"skipped", "files": [...]}}, ...}."""
        bad = int(self.planner.resolver.is_bad.sum()) if self.planner is not None else 0
        return {"backend": self.backend_name, "rank": self.rank, "num_files": self.num_samples,
                "unusable_files": bad,
                "converted_files": int((self.index.status == CONVERT).sum()) if self.index is not None else 0,
                "epochs": {e: {"skipped": r["skipped"], "files": list(r["files"]), "start_batch": r["start_batch"],
                               "batches": r["batches"]} for e, r in self._epochs.items()}}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
