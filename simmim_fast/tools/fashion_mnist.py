"""Fashion-MNIST from its four idx files (Debian package ``dataset-fashion-mnist``).

``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); ``SIMMIM_FASHION_MNIST`` or a ``root``
argument points elsewhere. Plain or gzipped files are read.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from ..errors import UserError, MissingFileError

__all__ = ["DEFAULT_ROOT", "CLASSES", "fashion_mnist_root", "check_files", "read_idx", "load_fashion_mnist",
           "write_image_folder"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_root(root: Optional[str | Path] = None) -> Path:
    return Path(root or os.environ.get("SIMMIM_FASHION_MNIST") or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise MissingFileError(f"Fashion-MNIST file {stem}[.gz] not found in {root}: install the Debian package "
                            f"(apt-get install dataset-fashion-mnist) or set SIMMIM_FASHION_MNIST to the folder "
                            f"holding the four idx files")


def check_files(root: Optional[str | Path] = None) -> Path:
    """The folder holding all four idx files (MissingFileError naming the first missing one)."""
    r = fashion_mnist_root(root)
    for stems in _FILES.values():
        for stem in stems:
            _find(r, stem)
    return r


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (the MNIST format: magic 0 0 dtype ndim, big-endian dims, data) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise UserError(f"{path} is not an idx file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise UserError(f"{path}: header says {dims} x {dtype} but the file holds {len(body)} data bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Optional[str | Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of the 'train' (60,000) or 'test' (10,000) split."""
    if split not in _FILES:
        raise UserError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    r = fashion_mnist_root(root)
    images = read_idx(_find(r, _FILES[split][0]))
    labels = read_idx(_find(r, _FILES[split][1])).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise UserError(f"Fashion-MNIST {split} in {r}: images {images.shape} and labels {labels.shape} do not pair")
    return images, labels


def write_image_folder(out: str | Path, split: str = "train", limit: Optional[int] = None,
                       root: Optional[str | Path] = None, start: int = 0) -> Path:
    """Write images ``start .. start+limit`` of a split as PNGs in ImageFolder layout (``out/<class>/``),
    e.g. as ``data.path`` for pretraining. Returns ``out``."""
    from PIL import Image
    images, labels = load_fashion_mnist(split, root)
    stop = images.shape[0] if limit is None else min(images.shape[0], start + limit)
    out = Path(out)
    for i in range(start, stop):
        folder = out / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{split}_{i:05d}.png")
    return out


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m simmim_fast.tools.fashion_mnist",
                                description="write Fashion-MNIST images as PNGs in ImageFolder layout (for data.path)")
    p.add_argument("output", help="folder to write (one sub-folder per class)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--limit", type=int, help="only this many images (from --start)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--root", help="folder of the idx files (default /usr/share/datasets/fashion-mnist)")
    a = p.parse_args(argv)
    out = write_image_folder(a.output, a.split, a.limit, a.root, a.start)
    print(f"wrote Fashion-MNIST {a.split} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
