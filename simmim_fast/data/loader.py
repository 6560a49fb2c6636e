"""The loader interface the training engine consumes, whatever the backend.

    loader = build_pretrain_loader(cfg, rank=0, world_size=1, device=torch.device("cuda"))
    for images, mask in loader.epoch(epoch, start_step=0):
        ...  # images (B, 3, S, S) float on device, normalised; mask (B, S/p, S/p) uint8 on device

Order and content are a function of (train.seed, epoch, rank, world size) only: an epoch restarted
at ``start_step`` yields exactly the batches an uninterrupted epoch yields from that step on.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import numpy as np
import torch

from ..config import Config
from ..masking import BatchMaskGenerator
from .files import list_images
from .torch_loader import PretrainImageDataset, make_torch_loader
from .transforms import PretrainTransform

__all__ = ["PretrainLoader", "build_pretrain_loader", "epoch_order"]


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> List[int]:
    """This rank's sample indices for an epoch: a seeded permutation, sharded, whole batches only.

    Every rank gets the same number of batches; the samples that do not fill a whole global batch
    are dropped for this epoch (a different set each epoch).
    """
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
    per_rank = (num_samples // world_size) // batch_size * batch_size
    return perm[rank:per_rank * world_size:world_size].tolist()


class PretrainLoader:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        d, m = cfg.data, cfg.model
        self.cfg = cfg
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.batch_size = cfg.train.micro_batch_size
        self.seed = cfg.train.seed
        self.paths = list_images(d.path, d.layout)
        self.num_samples = len(self.paths)
        self.steps_per_epoch = (self.num_samples // world_size) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset has {self.num_samples} images, fewer than one batch per rank "
                f"(train.micro_batch_size {self.batch_size} x world size {world_size}); "
                f"lower train.micro_batch_size or add images (data.path = {d.path})")
        self.masks = BatchMaskGenerator(m.img_size, cfg.mask.mask_patch_size, m.patch_size, cfg.mask.mask_ratio)
        if d.backend != "torch":
            raise ValueError(f"data.backend {d.backend!r} is not available in this build; use 'torch'")
        transform = PretrainTransform(m.img_size, d.crop_scale, d.crop_ratio, d.hflip_prob, d.mean, d.std)
        self.dataset = PretrainImageDataset(self.paths, transform, self.seed)

    def mask_generator(self, epoch: int, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        g.manual_seed(int(np.random.default_rng([self.seed, epoch, step, self.rank, 0x3A5C]).integers(2 ** 62)))
        return g

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size, self.batch_size)
        items = [(epoch, i) for i in order[start_step * self.batch_size:]]
        loader = make_torch_loader(self.dataset, items, self.batch_size, self.cfg.data.num_workers,
                                   pin_memory=self.device.type == "cuda")
        for step, images in enumerate(loader, start=start_step):
            images = images.to(self.device, non_blocking=True)
            g = self.mask_generator(epoch, step)
            mask = self.masks(images.shape[0], device=g.device, generator=g).to(self.device, non_blocking=True)
            yield images, mask

    def close(self) -> None:
        pass


def build_pretrain_loader(cfg: Config, rank: int = 0, world_size: int = 1,
                          device: torch.device | str = "cpu") -> PretrainLoader:
    return PretrainLoader(cfg, rank, world_size, device)
