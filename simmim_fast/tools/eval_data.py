"""Labelled data for evaluation: Fashion-MNIST or an ImageFolder with train/ and val/ splits.

Every image becomes the encoder's input: (C, S, S) for model.in_chans = C, normalised with the
checkpoint's mean/std. Fashion-MNIST's 28 x 28 grey images are upsampled (bilinear) to S and
repeated on the C channels (one channel for C = 1); ImageFolder images get the centre view
(shorter side to S, centre crop), no augmentation: 8-bit RGB for C = 3, else the bands as the
pretraining loader reads them (greyscale / 16-bit PNG, multi-band TIFF, .npy; data.value_range).

    data = "fashion-mnist"            # or "fashion-mnist:/path/to/idx/files", or an ImageFolder root
    train, val = eval_datasets(data, img_size, mean, std, train_limit=2000, val_limit=1000)
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from ..errors import UserError, MissingFileError

__all__ = ["ArrayImageDataset", "eval_datasets", "check_eval_data", "FASHION_MNIST"]

FASHION_MNIST = "fashion-mnist"


class ArrayImageDataset(Dataset):
    """(N, H, W) uint8 grey images + labels -> ((C, S, S) normalised float, label), C = len(mean)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels, self.size = images, labels, size
        self.channels = len(mean)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.classes = sorted(set(int(x) for x in labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.tensor(self.images[i], dtype=torch.float32).div_(255.0)[None, None]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x[0].expand(self.channels, -1, -1)
        return (x - self.mean) / self.std, int(self.labels[i])


def _subset(ds: Dataset, limit: Optional[int], seed: int) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
    return Subset(ds, idx.tolist())


def band_center_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """center_view for a (C, H, W) float tensor of any C: shorter side to ``size`` (bicubic, antialiased),
    centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size])


def check_eval_data(data: str, what: str = "--data") -> None:
    """Cheap check that ``data`` (as eval_datasets takes it) is there: MissingFileError naming it if not."""
    if data == FASHION_MNIST or data.startswith(FASHION_MNIST + ":"):
        from .fashion_mnist import check_files
        check_files(data.split(":", 1)[1] if ":" in data else None)
        return
    root = Path(data).expanduser()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise MissingFileError(f"{what} {root}: expected an ImageFolder root with train/ and val/ folders "
                               f"(one sub-folder per class in each), or 'fashion-mnist'")


def eval_datasets(data: str, img_size: int, mean: Sequence[float], std: Sequence[float],
                  train_limit: Optional[int] = None, val_limit: Optional[int] = None,
                  seed: int = 0, value_range: Optional[Sequence[float]] = None) -> Tuple[Dataset, Dataset]:
    """(train, val) datasets of len(mean) channels; limits take a seeded random subset (same subset for the
    same seed)."""
    if len(mean) != len(std):
        raise UserError(f"eval data: {len(mean)} mean but {len(std)} std values")
    channels = len(mean)
    if data == FASHION_MNIST or data.startswith(FASHION_MNIST + ":"):
        from .fashion_mnist import load_fashion_mnist
        root = data.split(":", 1)[1] if ":" in data else None
        train = ArrayImageDataset(*load_fashion_mnist("train", root), img_size, mean, std)
        val = ArrayImageDataset(*load_fashion_mnist("test", root), img_size, mean, std)
    else:
        from torchvision import datasets
        from torchvision.transforms import functional as TF

        from .images import center_view
        root = Path(data).expanduser()
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise MissingFileError(f"--data {root}: expected an ImageFolder root with train/ and val/ folders "
                                    f"(one sub-folder per class in each), or 'fashion-mnist'")

        if channels == 3 and value_range is None:
            def transform(img):
                return TF.normalize(TF.to_tensor(center_view(img.convert("RGB"), img_size)), list(mean), list(std))
            folder = dict(transform=transform)
        else:  # the bands as the pretraining loader reads them
            from ..data.files import IMAGE_EXTENSIONS
            from ..data.transforms import load_channels

            def transform(x):
                return TF.normalize(band_center_view(x, img_size), list(mean), list(std))
            folder = dict(transform=transform, loader=partial(load_channels, channels=channels, value_range=value_range),
                          is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
        train = datasets.ImageFolder(str(root / "train"), **folder)
        val = datasets.ImageFolder(str(root / "val"), **folder)
        if train.classes != val.classes:
            raise UserError(f"--data {root}: train/ and val/ have different class folders "
                             f"({len(train.classes)} vs {len(val.classes)})")
    return _subset(train, train_limit, seed), _subset(val, val_limit, seed + 1)
