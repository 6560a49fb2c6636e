"""Deterministic image preprocessing for evaluation tools, and back to displayable RGB.

Evaluation views are the centre square of an image: shorter side resized to ``size`` (bicubic,
antialiased), centre-cropped to ``size`` x ``size``, scaled to [0, 1], normalised with the
config's mean/std. A user mask goes through the same resize and crop (nearest) so that it stays
aligned with the image it was drawn on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from ..errors import MissingFileError, UserError

__all__ = ["center_view", "load_image", "load_user_mask", "open_image"]


def open_image(path: Path, what: str = "image") -> Image.Image:
    """The decoded image of a file the user named; a UserError naming it if it is not a readable image."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        why = "not an image file" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{what} {path} cannot be read: {why}") from None


def center_view(img: Image.Image, size: int, interpolation=InterpolationMode.BICUBIC) -> Image.Image:
    img = TF.resize(img, size, interpolation=interpolation)  # PIL input: always antialiased
    return TF.center_crop(img, [size, size])


def load_image(path: str | Path, size: int, mean: Sequence[float], std: Sequence[float],
               value_range: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(C, size, size) normalised float tensor of the centre view of an image file, C = len(mean): 8-bit RGB
    for C = 3 without ``value_range``, else the bands as the pretraining loader reads them."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}")
    if len(mean) != 3 or value_range is not None:
        from ..data.transforms import load_channels
        from .eval_data import band_center_view
        try:
            x = load_channels(path, len(mean), value_range)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        return TF.normalize(band_center_view(x, size), list(mean), list(std))
    img = open_image(path).convert("RGB")
    return TF.normalize(TF.to_tensor(center_view(img, size)), list(mean), list(std))


def load_user_mask(path: str | Path, size: int, image_size_of: str | Path | None = None) -> np.ndarray:
    """(size, size) float array in [0, 1] (1 = hide) from a mask image (white = hide).

    The mask is first stretched to the image it was drawn on (``image_size_of``) if the sizes
    differ, then given that image's centre view, so any mask drawn over the original file lines up.
    Transparent pixels of an RGBA mask count as not hidden.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"mask image not found: {path}")
    im = open_image(path, "mask image")
    if im.mode in ("RGBA", "LA", "P"):
        rgba = im.convert("RGBA")
        grey = Image.fromarray((np.asarray(rgba.convert("L"), dtype=np.float32)
                                * (np.asarray(rgba)[..., 3] / 255.0)).astype(np.uint8))
    else:
        grey = im.convert("L")
    if image_size_of is not None:
        ref_size = open_image(Path(image_size_of)).size
        if ref_size != grey.size:
            grey = grey.resize(ref_size, Image.NEAREST)
    view = center_view(grey, size, interpolation=InterpolationMode.NEAREST)
    return np.asarray(view, dtype=np.float32) / 255.0
