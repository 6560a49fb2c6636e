"""PIL side of the pretraining augmentation: decode to RGB, apply a view, normalise.

The view (crop box and flip) is chosen in views.py; this module only applies it, the way
torchvision's RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["load_rgb", "apply_view"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: greyscale, palette, CMYK and alpha (dropped) images included.

    PIL's own convert("RGB") clips 16-bit greyscale at 255 instead of scaling it, so those are
    scaled to 8 bits first (as the DALI decoders do).
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray((a >> 8).clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a whole image file as 8-bit RGB; raises (OSError, ValueError, ...) if it cannot be decoded."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def apply_view(img: Image.Image, view: Tuple[int, int, int, int, bool], size: int,
               mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Crop (top, left, height, width), resize to size x size (bilinear, antialiased), flip, normalise."""
    top, left, h, w, flip = view
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                          antialias=True)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))
