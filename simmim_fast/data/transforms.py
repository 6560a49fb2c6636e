"""PIL side of the pretraining augmentation: decode to RGB, apply a view, normalise.

The view (crop box and flip) is chosen in views.py; this module only applies it, the way
torchvision's RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize would.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .webdataset import open_source, source_suffix

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


def load_rgb(path) -> Image.Image:
    """Decode a whole image file (or shard member) as 8-bit RGB; raises (OSError, ValueError, ...) if it
    cannot be decoded."""
    with open_source(path) as f, Image.open(f) as im:
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


def to_unit(a: np.ndarray, value_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """Pixel values to float32 in the 0-1 value space: uint8 / 255, uint16 / 65535, floats as stored;
    with ``value_range`` (lo, hi) in stored units, (x - lo) / (hi - lo) instead (not clipped)."""
    if value_range is not None:
        if a.dtype.kind not in "uif":
            raise ValueError(f"pixel type {a.dtype} is not an integer or float type")
        lo, hi = float(value_range[0]), float(value_range[1])
        return ((a.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    raise ValueError(f"pixel type {a.dtype} is not uint8, uint16 or float")


# PIL modes read as one band; modes converted to RGB first (the others: their own bands, e.g. RGBA 4).
_ONE_BAND_MODES = _SIXTEEN_BIT_MODES + ("L", "F", "1")
_TO_RGB_MODES = ("P", "CMYK", "YCbCr")


def pil_channels(mode: str) -> int:
    """How many channels load_channels reads from a PIL image of this mode."""
    if mode in _ONE_BAND_MODES:
        return 1
    if mode in _TO_RGB_MODES:
        return 3
    return Image.getmodebands(mode)


def array_channels(shape: Sequence[int], channels: int) -> Tuple[Optional[int], int, int]:
    """(channel count or None if no axis fits, height, width) of an array read for ``channels`` channels:
    (H, W) is 1 channel; (C, H, W) is tried before (H, W, C)."""
    if len(shape) == 2:
        return 1, int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] == channels:
        return channels, int(shape[1]), int(shape[2])
    if len(shape) == 3 and shape[-1] == channels:
        return channels, int(shape[0]), int(shape[1])
    return None, 0, 0


def load_channels(path, channels: int, value_range: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Decode a file as a (C, H, W) float32 tensor in 0-1 with exactly ``channels`` channels.

    For in_chans other than 3: greyscale (8- or 16-bit) PNG/TIFF stay 1 channel; ``.npy`` arrays
    are (H, W, C) or (C, H, W), the channel axis being the one of length ``channels``. A file with
    another channel count raises ValueError with the counts (the loaders skip it, naming the reason):
    it is never cropped or padded to fit. ``value_range``: see to_unit.
    """
    suffix = source_suffix(path)
    if suffix in (".npy", ".tif", ".tiff"):
        with open_source(path) as f:
            if suffix == ".npy":
                a = np.load(f, allow_pickle=False)
            else:
                import tifffile  # PIL reads neither multi-band nor most 16-bit multi-sample TIFFs
                a = tifffile.imread(f)
        found, _, _ = array_channels(a.shape, channels)
        if found is None:
            raise ValueError(f"array of shape {a.shape} has no axis of {channels} channels")
        a = a[None] if a.ndim == 2 else a if a.shape[0] == channels else np.moveaxis(a, -1, 0)
    else:
        with open_source(path) as f, Image.open(f) as im:
            im.load()
            if im.mode in _ONE_BAND_MODES:
                a = np.asarray(im.convert("L") if im.mode == "1" else im)
                if a.dtype.kind in "iu" and a.dtype != np.uint8:  # 16-bit modes may arrive as int32
                    a = a.astype(np.uint16)
                a = a[None]
            else:
                a = np.moveaxis(np.asarray(im.convert("RGB") if im.mode in _TO_RGB_MODES else im), -1, 0)
    if a.shape[0] != channels:
        raise ValueError(f"{a.shape[0]} channels, model.in_chans is {channels}")
    return torch.from_numpy(np.ascontiguousarray(to_unit(a, value_range)))


def turn(x: torch.Tensor, vflip: bool, turns: int) -> torch.Tensor:
    """Vertical flip, then ``turns`` 90-degree counter-clockwise rotations, of a (C, S, S) tensor (exact:
    a permutation of pixels, so it commutes with the per-channel normalisation)."""
    if vflip:
        x = x.flip(-2)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def apply_view_tensor(img: torch.Tensor, view: Tuple[int, int, int, int, bool], size: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """apply_view for a (C, H, W) float tensor of any C: the same crop, bilinear antialiased resize and
    flip on every band alike, then per-channel normalisation."""
    top, left, h, w, flip = view
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                          antialias=True)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(img, list(mean), list(std))
