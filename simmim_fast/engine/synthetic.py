"""data.backend 'synthetic': random tensors already on the device, to measure the model and engine only.

Same interface as simmim_fast.data's loaders. The images are drawn once (seeded) and reused; masks
are drawn once for a few batches and cycled, so a step costs no data work at all. An epoch has as
many steps as ImageNet-1K (1,281,167 images) would give, so schedules look as in a real run.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from ..config import Config
from ..masking import BatchMaskGenerator

__all__ = ["SyntheticLoader", "SYNTHETIC_EPOCH_IMAGES"]

SYNTHETIC_EPOCH_IMAGES = 1_281_167


class SyntheticLoader:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, mask_batches: int = 4):
        m = cfg.model
        self.batch_size = cfg.train.micro_batch_size
        self.device = torch.device(device)
        self.steps_per_epoch = SYNTHETIC_EPOCH_IMAGES // (world_size * self.batch_size)
        g = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1000 + rank)
        self.images = torch.randn(self.batch_size, m.in_chans, m.img_size, m.img_size, generator=g).to(self.device)
        masks = BatchMaskGenerator(m.img_size, cfg.mask.mask_patch_size, m.patch_size, cfg.mask.mask_ratio)
        self.masks = [masks(self.batch_size, generator=g).to(self.device) for _ in range(mask_batches)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.images, self.masks[step % len(self.masks)]

    def close(self) -> None:
        pass
