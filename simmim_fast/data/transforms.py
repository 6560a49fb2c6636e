"""SimMIM pretraining augmentation with explicit, per-sample random state.

Each sample's crop and flip are drawn from a generator seeded by (seed, epoch, index), so the
same image at the same epoch gets the same view whatever the worker, rank or resume point.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["sample_crop", "sample_rng", "PretrainTransform"]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def sample_crop(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm with an explicit generator.

    Ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, a centre crop clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """PIL RGB image -> normalised (3, size, size) float tensor: RandomResizedCrop, flip, normalise."""

    def __init__(self, size: int, scale, ratio, hflip_prob: float, mean, std):
        self.size = size
        self.scale, self.ratio, self.hflip_prob = tuple(scale), tuple(ratio), hflip_prob
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        top, left, h, w = sample_crop(img.width, img.height, self.scale, self.ratio, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BILINEAR, antialias=True)
        if rng.uniform() < self.hflip_prob:
            img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)
