"""SimMIM random masking.

Per sample, a g x g grid of mask patches (g = input_size / mask_patch_size) gets
ceil(g * g * mask_ratio) cells chosen uniformly without replacement (1 = masked); the grid is
then repeated scale = mask_patch_size / model_patch_size times along both axes, giving the
token-level mask the encoder sees (48 x 48 for Swin at 192 px).

``MaskGenerator`` is the per-sample numpy generator of the official code (used in CPU data
workers); ``BatchMaskGenerator`` draws a whole (B, h, w) batch on any torch device with the same
distribution, for GPU pipelines.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

__all__ = ["MaskGenerator", "BatchMaskGenerator", "check_mask_geometry"]


def check_mask_geometry(input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float) -> None:
    """Raise ValueError naming the argument if the masking geometry is inconsistent."""
    for name, v in (("input_size", input_size), ("mask_patch_size", mask_patch_size),
                    ("model_patch_size", model_patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if input_size % mask_patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by mask_patch_size {mask_patch_size}")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size {mask_patch_size} is not divisible by model_patch_size {model_patch_size}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}")


class _Geometry:
    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        check_mask_geometry(input_size, mask_patch_size, model_patch_size, mask_ratio)
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = float(mask_ratio)
        self.rand_size = input_size // mask_patch_size          # g
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(math.ceil(self.token_count * self.mask_ratio))
        self.token_grid = self.rand_size * self.scale          # h = w of the token mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
                f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})")


class MaskGenerator(_Geometry):
    """Official per-sample SimMIM mask: ``MaskGenerator(192, 32, 4, 0.6)()`` -> (48, 48) int array.

    ``rng`` (a ``numpy.random.Generator``) makes draws reproducible; the default uses numpy's
    global state as the official code does.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, rng: Optional[np.random.Generator] = None):
        super().__init__(input_size, mask_patch_size, model_patch_size, mask_ratio)
        self.rng = rng

    def __call__(self) -> np.ndarray:
        if self.rng is None:
            idx = np.random.permutation(self.token_count)[:self.mask_count]
        else:
            idx = self.rng.permutation(self.token_count)[:self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


class BatchMaskGenerator(_Geometry):
    """Batched SimMIM masks on any device: ``BatchMaskGenerator(...)(B, device=...)`` -> (B, h, w).

    Each sample masks a uniformly random subset of exactly ``mask_count`` grid cells (ranks of
    i.i.d. uniform keys), the same distribution as ``MaskGenerator``. Returns ``dtype`` (default
    uint8, cheap to move and accepted by every op of this package).
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        super().__init__(input_size, mask_patch_size, model_patch_size, mask_ratio)

    def __call__(self, batch_size: int, device: torch.device | str | None = None,
                 generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is not None and device is None:
            device = generator.device
        keys = torch.rand(batch_size, self.token_count, device=device, generator=generator)
        # A cell is masked when its key ranks among the mask_count smallest: a uniform subset.
        ranks = keys.argsort(dim=1).argsort(dim=1)
        grid = (ranks < self.mask_count).to(dtype).view(batch_size, self.rand_size, self.rand_size)
        return grid.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
