"""The 'torch' backend: PIL decode + torchvision transforms in DataLoader worker processes."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .transforms import PretrainTransform, sample_rng

__all__ = ["PretrainImageDataset", "make_torch_loader"]


class PretrainImageDataset(Dataset):
    """Items are (epoch, index) pairs so the augmentation is seeded per sample and epoch."""

    def __init__(self, paths: Sequence[Path], transform: PretrainTransform, seed: int):
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        epoch, index = item
        path = self.paths[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return self.transform(img, sample_rng(self.seed, epoch, index))


def make_torch_loader(dataset: PretrainImageDataset, items: List[tuple], batch_size: int, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)
