"""The file index: every image's size and whether it can be used, checked once and cached.

Training needs each file's (width, height) to draw its crop box before decoding (views.py), and
must know the undecodable files before they reach a decoder: a DALI pipeline cannot skip a
sample, one bad file kills the whole batch. The index holds, per file:

- width, height (as stored, no EXIF rotation: no backend applies EXIF orientation);
- status: OK, CONVERT (decodable, but not in a format the DALI decoders read, e.g. GIF: the DALI
  backends get a PNG copy) or BAD (skipped, with a reason);
- a note for files that are used but converted on the way (greyscale, CMYK, alpha, 16-bit ...).

Checks: 'header' (default) opens the header with PIL and checks that a JPEG ends with its
end-of-image marker and a PNG with its IEND chunk (a cut-off download decodes "fine" in libjpeg,
grey-filled, so the marker check is what keeps it out), and decodes every JPEG's entropy-coded data
with libjpeg-turbo in strict mode (``jpeg_stream_problem``: decoder warnings count as corrupt, the one
rule that lets every backend skip the same files); 'decode' also decodes every file in full with PIL.
A broken symbolic link is unusable ('broken link').
The result is cached under data.cache_dir, keyed by the dataset path, and reused for every file
whose size and modification time are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .transforms import array_channels, load_rgb, pil_channels
from .webdataset import Member, MemberTable, open_source, source_suffix
from ..errors import UserError

__all__ = ["OK", "CONVERT", "BAD", "CHECKS", "FileCheck", "ImageIndex", "PathTable", "check_image_file",
           "jpeg_stream_problem",
           "build_index", "default_cache_dir", "FileResolver"]

log = logging.getLogger("simmim_fast.data")

OK, CONVERT, BAD = 0, 1, 2
CHECKS = {"header": 1, "decode": 2}
# PIL format names of what nvImageCodec (the DALI decoders) reads; MPO is a multi-picture JPEG.
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"}
_TAIL_BYTES = 16384
ARRAY_SUFFIXES = (".npy", ".tif", ".tiff")  # read by numpy / tifffile when bands are kept as stored
TORCH_ONLY = "(torch backend only)"  # the note of files only the torch backend reads
_CACHE_VERSION = 2  # 2: the strict JPEG stream check (corrupt entropy-coded data)


@dataclass
class FileCheck:
    width: int = 0
    height: int = 0
    status: int = BAD
    reason: str = ""  # why a BAD file is skipped
    note: str = ""    # what conversion a usable file gets on the way to RGB ("; "-separated)


def _describe_mode(fmt: str, mode: str, head: bytes) -> str:
    if fmt == "PNG" and len(head) > 24 and head[24] == 16:
        return "16-bit PNG"
    return {"L": "greyscale", "LA": "greyscale with alpha", "1": "1-bit", "P": "palette", "PA": "palette with alpha",
            "RGBA": "RGBA (alpha dropped)", "CMYK": "CMYK", "YCbCr": "YCbCr", "I;16": "16-bit greyscale",
            "I;16B": "16-bit greyscale", "I": "32-bit integer", "F": "floating point"}.get(mode, "")


def _array_header(path, channels: int) -> Optional[FileCheck]:
    """Size and channel count of a ``.npy`` array or a TIFF read with tifffile (what the torch backend's
    band reader opens); None for other files. ``path`` is a file or a shard member."""
    suffix = source_suffix(path)
    try:
        if suffix == ".npy":
            with open_source(path) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            what = ".npy array"
        elif suffix in (".tif", ".tiff"):
            import tifffile
            with open_source(path) as f, tifffile.TiffFile(f) as t:
                series = t.series[0]  # what tifffile.imread returns
                shape, dtype = series.shape, series.dtype
            what = "TIFF"
        else:
            return None
    except Exception as e:  # noqa: BLE001
        return FileCheck(reason=f"unreadable array header: {type(e).__name__}: {e}")
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3):
        return FileCheck(reason=f"array of shape {shape} is not (H, W), (H, W, C) or (C, H, W)")
    found, h, w = array_channels(shape, channels)
    if found is None:
        return FileCheck(reason=f"array of shape {shape} has no axis of {channels} channels (model.in_chans)")
    if found != channels:
        return FileCheck(w, h, BAD, f"{found} channels, model.in_chans is {channels}")
    if w < 1 or h < 1:
        return FileCheck(reason=f"image has no pixels ({w}x{h})")
    return FileCheck(w, h, CONVERT, "", f"{what} {shape} {dtype} {TORCH_ONLY}")


_warned_no_simplejpeg = False


def jpeg_stream_problem(path) -> Optional[str]:
    """What libjpeg-turbo reports for a JPEG's entropy-coded data, or None if it decodes without a word.

    Decoders treat damaged JPEG data differently: PIL raises for some damage, libjpeg (DALI's CPU decoder)
    only warns ("Corrupt JPEG data: premature end of data segment") and returns a damaged or
    grey-filled image, and a cut file with an end-of-image marker appended passes every decoder. One rule
    for every backend: a JPEG whose data makes libjpeg-turbo warn is corrupt. The check decodes in strict
    mode (warnings raise) at 1/8 scale to grey: the whole entropy-coded stream is read, the IDCT and
    colour work mostly skipped. Without the simplejpeg package it is skipped, with one warning."""
    global _warned_no_simplejpeg
    try:
        import simplejpeg
    except ImportError:
        if not _warned_no_simplejpeg:
            _warned_no_simplejpeg = True
            log.warning("data: simplejpeg is not installed (pip install simplejpeg): JPEGs whose data makes the "
                        "decoder warn are not found before training")
        return None
    with open_source(path) as f:  # a file or a shard member
        data = f.read()
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY", fastdct=True,
                               fastupsample=True, min_height=1, min_width=1, min_factor=8, strict=True)
    except ValueError as e:
        return str(e).strip() or type(e).__name__
    return None


def check_image_file(path, check: str = "header", channels: Optional[int] = None) -> FileCheck:
    """Check one file or shard member (never raises for a bad file: the reason is in the result).

    ``channels`` None: the file will be read as 8-bit RGB (model.in_chans 3, default scaling), and
    only arrays are checked for 3 channels; else the file's bands must number ``channels``
    (a file with another count is unusable, never cropped or padded)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, Member):
        if path.offset < 0:
            return FileCheck(reason="member missing from damaged shard (its tar header is unreadable)")
    else:
        path = Path(path)
        if path.is_symlink() and not path.exists():
            return FileCheck(reason=f"broken link (to {os.readlink(path)})")
    try:
        size = path.size if isinstance(path, Member) else path.stat().st_size
        if size == 0:
            return FileCheck(reason="empty file (0 bytes)")
        if channels is not None and source_suffix(path) in ARRAY_SUFFIXES:
            return _array_header(path, channels)  # the band reader opens these with numpy / tifffile
        with open_source(path) as f:
            head = f.read(32)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
            f.seek(0)
            with Image.open(f) as im:
                fmt, mode, (w, h) = im.format or "", im.mode, im.size
                frames = getattr(im, "n_frames", 1)
    except UnidentifiedImageError:
        arr = _array_header(path, channels or 3)  # multi-band / 16-bit TIFF and .npy arrays: read by the torch backend
        if arr is not None:
            return arr
        return FileCheck(reason="not an image (no known image format)")
    except Exception as e:  # noqa: BLE001 - any failure to read the header makes the file unusable
        return FileCheck(reason=f"unreadable header: {type(e).__name__}: {e}")
    if w < 1 or h < 1:
        return FileCheck(reason=f"image has no pixels ({w}x{h})")
    if channels is not None and pil_channels(mode) != channels:
        return FileCheck(w, h, BAD, f"{pil_channels(mode)} channels, model.in_chans is {channels}")
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        return FileCheck(w, h, BAD, "truncated JPEG (no end-of-image marker)")
    if fmt in ("JPEG", "MPO"):  # every check level: the index decides for every backend alike
        problem = jpeg_stream_problem(path)
        if problem is not None:
            return FileCheck(w, h, BAD, f"corrupt JPEG data (libjpeg-turbo: {problem})")
    if fmt == "PNG" and b"IEND" not in tail[-64:]:
        return FileCheck(w, h, BAD, "truncated PNG (no IEND chunk)")
    if check == "decode":
        try:
            img = load_rgb(path)
            if img.size != (w, h):
                return FileCheck(w, h, BAD, f"decoded size {img.size} differs from header size {(w, h)}")
        except Exception as e:  # noqa: BLE001
            return FileCheck(w, h, BAD, f"decode failed: {type(e).__name__}: {e}")
    notes = [n for n in (_describe_mode(fmt, mode, head),) if n]
    if frames > 1:
        notes.append(f"{frames} frames (first used)")
    status = OK
    if fmt not in DALI_FORMATS or (fmt == "WEBP" and head[12:16] == b"VP8X"):
        status = CONVERT  # nvImageCodec reads neither GIF nor extended WebP: DALI gets a PNG copy
        notes.append(f"{fmt or 'unknown format'} (DALI reads a PNG copy)")
    return FileCheck(w, h, status, "", "; ".join(notes))


def _check_many(args: Tuple[list, str, Optional[int]]) -> List[FileCheck]:
    paths, check, channels = args
    return [check_image_file(p, check, channels) for p in paths]


class PathTable(Sequence[Path]):
    """File paths packed in one bytes buffer: ~70 bytes a file where a list of Path objects takes ~450
    (ImageNet: 90 MB instead of 560 MB per rank), and cheap to hand to DataLoader worker processes."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        encoded = [os.fsencode(os.fspath(p)) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, i: int) -> bytes:
        """The i-th path as the file system's bytes."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"path index {i} out of range for {len(self)} files")
        i %= len(self)
        return self._blob[self._offsets[i]:self._offsets[i + 1]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Path(os.fsdecode(self.raw(int(i))))


@dataclass
class ImageIndex:
    """Per-file facts for a dataset, in the order of ``paths`` (the sorted file list)."""
    paths: Sequence[Path]
    width: np.ndarray
    height: np.ndarray
    status: np.ndarray
    reasons: Dict[int, str] = field(default_factory=dict)
    notes: Dict[int, str] = field(default_factory=dict)
    cache_file: Optional[Path] = None
    checked: int = 0           # files checked now (the others came from the cache)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    def restrict_min_side(self, min_side: int) -> None:
        """Mark files whose shorter side is below ``min_side`` pixels BAD."""
        if min_side <= 0:
            return
        small = (self.status != BAD) & (np.minimum(self.width, self.height) < min_side)
        for i in np.flatnonzero(small):
            self.status[i] = BAD
            self.reasons[int(i)] = (f"smaller than data.min_image_side = {min_side} px "
                                    f"({self.width[i]}x{self.height[i]})")

    @property
    def bad(self) -> np.ndarray:
        return np.flatnonzero(self.status == BAD)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simmim-fast"


def _cache_path(cache_dir: Path, dataset_key: str) -> Path:
    digest = hashlib.sha1(dataset_key.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return cache_dir / "index" / f"{digest}.npz"


def _load_cache(file: Path) -> Dict[str, tuple]:
    try:
        with np.load(file, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION:
                return {}
            paths = bytes(z["paths"]).decode("utf-8", "surrogateescape").split("\n")
            texts = json.loads(bytes(z["texts"]).decode("utf-8"))
            cols = [z[k] for k in ("size", "mtime", "level", "width", "height", "status")]
    except (OSError, KeyError, ValueError) as e:
        log.warning("data: ignoring unreadable index cache %s (%s)", file, e)
        return {}
    out = {}
    for i, p in enumerate(paths):
        reason, note = texts.get(str(i), ["", ""])
        out[p] = tuple(int(c[i]) for c in cols) + (reason, note)
    return out


def _save_cache(file: Path, rows: Dict[str, tuple]) -> None:
    names = list(rows)
    if any("\n" in n for n in names):
        return  # the path list is newline-separated; such names are too odd to be worth caching
    cols = list(zip(*rows.values())) if rows else [()] * 8
    texts = {str(i): [r[6], r[7]] for i, r in enumerate(rows.values()) if r[6] or r[7]}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # written whole, then renamed: ranks racing to write never see half a file
        np.savez(f, version=np.array(_CACHE_VERSION),
                 paths=np.frombuffer("\n".join(names).encode("utf-8", "surrogateescape"), dtype=np.uint8),
                 texts=np.frombuffer(json.dumps(texts).encode("utf-8"), dtype=np.uint8),
                 size=np.array(cols[0], dtype=np.int64), mtime=np.array(cols[1], dtype=np.int64),
                 level=np.array(cols[2], dtype=np.int8), width=np.array(cols[3], dtype=np.int32),
                 height=np.array(cols[4], dtype=np.int32), status=np.array(cols[5], dtype=np.int8))
    os.replace(tmp, file)


def build_index(paths: Sequence, dataset_key: str, check: str = "header",
                cache_dir: Optional[str | os.PathLike] = None, workers: int = 4, processes: bool = False,
                use_cache: bool = True, progress: Optional[Callable[[int, int], None]] = None,
                channels: Optional[int] = None) -> ImageIndex:
    """Check every file (or take the cached result for unchanged files) and return the index.

    ``dataset_key`` names the dataset in the cache (its resolved path and layout); ``processes``
    checks in worker processes (for the scan command) instead of threads (safe inside training).
    ``paths`` are file paths, or a ``MemberTable`` of shard members (cached by member size and
    shard modification time). ``channels``: see check_image_file (part of ``dataset_key`` when set).
    """
    if check not in CHECKS:
        raise UserError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    start = time.perf_counter()
    level = CHECKS[check]
    members = isinstance(paths, MemberTable)
    names = [str(p) for p in paths]
    stats: List[Tuple[int, int]] = []
    if members:
        stats = paths.stats()
    else:
        for p in names:
            try:
                st = os.stat(p)
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((-1, -1))
    cache_file = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), dataset_key) if use_cache else None
    cached = _load_cache(cache_file) if cache_file is not None and cache_file.is_file() else {}
    results: List[Optional[tuple]] = []
    todo: List[int] = []
    for i, (p, (size, mtime)) in enumerate(zip(names, stats)):
        row = cached.get(p)
        if row is not None and row[0] == size and row[1] == mtime and row[2] >= level:
            results.append(row)
        else:
            results.append(None)
            todo.append(i)
    if todo:
        chunk = max(1, min(256, len(todo) // max(1, workers * 4)))
        batches = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
        pool: Executor
        pool = (ProcessPoolExecutor(workers) if processes and workers > 1 else ThreadPoolExecutor(max(1, workers)))
        done = 0
        with pool:
            for batch, checks in zip(batches, pool.map(_check_many, [([paths[i] if members else names[i] for i in b], check, channels)
                                                                     for b in batches])):
                for i, c in zip(batch, checks):
                    results[i] = (stats[i][0], stats[i][1], level, c.width, c.height, c.status, c.reason, c.note)
                done += len(batch)
                if progress is not None:
                    progress(done, len(todo))
        if cache_file is not None:
            current = {names[i]: results[i] for i in range(len(names)) if stats[i][0] >= 0}
            try:
                _save_cache(cache_file, current)
            except OSError as e:
                log.warning("data: could not write the index cache %s (%s); set data.cache_dir to a writable "
                            "folder to skip re-checking files next time", cache_file, e)
                cache_file = None
    rows = results  # every entry is filled now
    index = ImageIndex(
        paths=paths if members else PathTable(names),
        width=np.array([r[3] for r in rows], dtype=np.int64),
        height=np.array([r[4] for r in rows], dtype=np.int64),
        status=np.array([r[5] for r in rows], dtype=np.int8),
        reasons={i: r[6] for i, r in enumerate(rows) if r[5] == BAD},
        notes={i: r[7] for i, r in enumerate(rows) if r[7]},
        cache_file=cache_file, checked=len(todo), seconds=time.perf_counter() - start)
    return index


class FileResolver:
    """Which file each sample slot actually reads: itself, or a deterministic stand-in if it is bad.

    The stand-in of slot i is the first usable file after i in a fixed seeded permutation of all
    files (epoch independent), so bad files are spread over different stand-ins and the choice
    depends only on which files are bad, never on when that was found out. Files found
    undecodable during training are added with ``mark_bad``; every backend resolves the same way.
    """

    def __init__(self, index: ImageIndex, seed: int):
        self.index = index
        self.is_bad = index.status == BAD
        self.reasons = dict(index.reasons)
        n = len(index)
        self.perm = np.random.default_rng([seed, 0xFA11BAC]).permutation(n)
        self.pos = np.empty(n, dtype=np.int64)
        self.pos[self.perm] = np.arange(n)
        if self.is_bad.all():
            raise UserError(f"none of the {n} files of the dataset can be used; first: {index.paths[0]}: "
                             f"{self.reasons.get(0, '')}")

    def mark_bad(self, file: int, reason: str) -> None:
        self.is_bad[file] = True
        self.reasons.setdefault(int(file), reason)
        if self.is_bad.all():
            raise UserError("every file of the dataset has turned out undecodable")

    def stand_in(self, file: int) -> int:
        n = len(self.perm)
        k = int(self.pos[file])
        for j in range(1, n):
            cand = int(self.perm[(k + j) % n])
            if not self.is_bad[cand]:
                return cand
        raise UserError("every file of the dataset is undecodable")

    def resolve(self, slots: np.ndarray) -> np.ndarray:
        files = np.asarray(slots, dtype=np.int64).copy()
        for j in np.flatnonzero(self.is_bad[files]):
            files[j] = self.stand_in(int(files[j]))
        return files
