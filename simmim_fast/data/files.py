"""Finding the images of a dataset: ImageFolder tree, flat folder, a file list, or WebDataset shards."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .index import default_cache_dir
from .samples import sample_photo_paths
from .webdataset import is_shard_dataset, open_shards
from ..errors import UserError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif", ".npy")

__all__ = ["IMAGE_EXTENSIONS", "list_images", "detect_layout"]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _is_file_or_broken_link(p: Path) -> bool:
    """A file, or a symlink whose target is gone: listed, so the index reports it ('broken link'), never
    dropped without a word."""
    return p.is_file() or (p.is_symlink() and not p.exists())


def detect_layout(path: Path) -> str:
    """'webdataset' for a shard folder or manifest, 'filelist' for another file, 'imagefolder' for a folder
    whose entries are only sub-folders, else 'flat'."""
    if is_shard_dataset(path):
        return "webdataset"
    if path.is_file():
        return "filelist"
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if entries and all(e.is_dir() for e in entries):
        return "imagefolder"
    return "flat"


def list_images(path: Optional[str], layout: str = "auto", cache_dir: Optional[str] = None) -> Sequence:
    """Sorted image paths of the dataset (sorted so that every rank sees the same order).

    ``path`` None means the sample photos shipped with scikit-image. For shards (layout
    'webdataset') the samples are shard members (``webdataset.Member``) in the order they were
    sharded; ``cache_dir`` keeps their verified checksums. Raises FileNotFoundError if the path
    is missing and ValueError if it holds no images.
    """
    if path is None:
        return sample_photo_paths()
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFileError(f"data.path does not exist: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "webdataset":
        members = open_shards(root, cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
        if not len(members):
            raise UserError(f"the shards at data.path {root} hold no samples")
        return members
    if layout == "filelist":
        if not root.is_file():
            raise UserError(f"data.layout is 'filelist' but data.path {root} is not a file")
        base = root.parent
        paths = []
        for line in root.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line.split("\t")[0].split(" ")[0])
                paths.append(p if p.is_absolute() else base / p)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise MissingFileError(f"{len(missing)} files listed in {root} do not exist, e.g. {missing[0]}")
    else:
        if not root.is_dir():
            raise UserError(f"data.layout is '{layout}' but data.path {root} is not a folder")
        pattern = "*/*" if layout == "imagefolder" else "*"
        paths = [p for p in root.glob(pattern) if _is_file_or_broken_link(p) and _is_image(p)]
        if layout == "imagefolder":  # also accept nested class folders
            paths += [p for p in root.glob("*/*/**/*") if _is_file_or_broken_link(p) and _is_image(p)]
    paths = sorted(set(paths))
    if not paths:
        raise UserError(f"no images found in data.path {root} (layout {layout}; extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return paths
