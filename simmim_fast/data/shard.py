"""``simmim-fast shard SRC OUT``: a dataset as WebDataset tar shards, with DALI index files and a manifest.

    simmim-fast shard /data/imagenet/train /data/imagenet_shards --shard-size-mb 1024

Reads the dataset exactly as training lists it (same layouts, same sorted order) and writes
``OUT/shard-000000.tar`` ... (POSIX ustar; one member per file holding the file's bytes
unchanged, named ``<key>.<ext>``), ``OUT/shard-000000.idx`` ... (DALI's ``wds2idx`` format v1.2,
what ``fn.readers.webdataset(index_paths=...)`` reads) and ``OUT/manifest.json`` (sample count,
per-shard counts, sizes and SHA-256 checksums). Keys are ``<8-digit position>_<path with every
character but letters, digits, '-' and '_' replaced by '_'>``: no dots (WebDataset splits the key
from the extension at the first dot) and no spaces, unique by the position. Sample i of the
shards is file i of the folder, so the same seed gives the same batches from either
(webdataset.py). Unusable files are sharded too (their bytes as they are), so both skip the same
samples for the same reasons.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..errors import UserError
from .files import list_images
from .webdataset import BLOCK, FORMAT, INDEX_VERSION, MANIFEST

__all__ = ["add_arguments", "main", "write_shards", "sample_key"]

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_KEY = 80  # member names stay within ustar's 100-byte name field


def sample_key(position: int, relative: str) -> str:
    """The WebDataset key of file ``position`` (relative path ``relative``): no dots, no spaces, unique."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    clean = _KEY_CHARS.sub("_", stem).strip("_")[:_MAX_KEY]
    return f"{position:08d}_{clean}" if clean else f"{position:08d}"


def _relative(path: Path, root: Optional[Path]) -> str:
    if root is not None:
        try:
            return path.resolve().relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class _ShardWriter:
    """One tar being written: headers and data by hand, so every member's data offset is known exactly."""

    def __init__(self, out: Path, number: int):
        self.tar_name, self.idx_name = f"shard-{number:06d}.tar", f"shard-{number:06d}.idx"
        self.out = out
        self.tmp = out / f".{self.tar_name}.tmp"
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.pos = 0
        self.rows: List[str] = []

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(_header(name, len(data)))
        offset = self.pos
        self._write(data)
        if len(data) % BLOCK:
            self._write(b"\0" * (BLOCK - len(data) % BLOCK))
        self.rows.append(f"{name.split('.', 1)[1]} {offset} {len(data)} {name}")

    def finish(self) -> dict:
        self._write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self.f.close()
        os.replace(self.tmp, self.out / self.tar_name)
        tmp_idx = self.out / f".{self.idx_name}.tmp"
        tmp_idx.write_text(f"{INDEX_VERSION} {len(self.rows)}\n" + "".join(r + "\n" for r in self.rows))
        os.replace(tmp_idx, self.out / self.idx_name)
        return {"tar": self.tar_name, "idx": self.idx_name, "samples": len(self.rows), "bytes": self.pos,
                "sha256": self.sha.hexdigest()}


def write_shards(paths: Sequence[Path], out: Path, shard_bytes: int, root: Optional[Path] = None,
                 source: str = "", progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write ``paths`` (in this order) as shards of about ``shard_bytes`` into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists() or any(out.glob("shard-*.tar")):
        raise UserError(f"{out} already holds shards; give an empty or new output folder")
    root = root.resolve() if root is not None else None
    shards: List[dict] = []
    writer: Optional[_ShardWriter] = None
    total = 0
    for i, p in enumerate(paths):
        data = Path(p).read_bytes()
        suffix = Path(p).suffix.lower().lstrip(".") or "bin"
        name = f"{sample_key(i, _relative(Path(p), root))}.{suffix}"
        member_bytes = BLOCK + -(-len(data) // BLOCK) * BLOCK
        if writer is not None and writer.rows and writer.pos + member_bytes + 2 * BLOCK > shard_bytes:
            shards.append(writer.finish())
            writer = None
        if writer is None:
            writer = _ShardWriter(out, len(shards))
        writer.add(name, data)
        total += len(data)
        if progress is not None:
            progress(i + 1, len(paths))
    if writer is not None:
        shards.append(writer.finish())
    manifest = {"format": FORMAT, "version": 1, "source": source, "samples": len(paths),
                "source_bytes": total, "shard_size_bytes": shard_bytes, "shards": shards}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)  # last: a folder with a manifest holds complete shards
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="dataset: an ImageFolder tree, a flat folder of images or a text file listing "
                                    "images (as data.path)")
    parser.add_argument("out", type=Path, help="output folder (new or empty)")
    parser.add_argument("--shard-size-mb", type=float, default=1024.0,
                        help="target shard size in MiB (default 1024); a file larger than this gets a shard alone")
    parser.add_argument("--layout", choices=["auto", "imagefolder", "flat", "filelist"], default="auto",
                        help="how to read SRC (data.layout; default auto)")


def main(args: argparse.Namespace) -> int:
    if not args.shard_size_mb > 0:
        raise UserError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    paths = list_images(args.src, args.layout)
    src = Path(args.src).expanduser()
    root = src.parent if src.is_file() else src
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and (done % 1000 == 0 or done == total):
            print(f"\rshard: {done}/{total} files", end="" if done < total else "\n", file=sys.stderr, flush=True)

    manifest = write_shards(paths, args.out, int(args.shard_size_mb * 2 ** 20), root=root,
                            source=str(src.resolve()), progress=progress)
    print(f"wrote {manifest['samples']} samples ({manifest['source_bytes'] / 2 ** 20:.1f} MiB) in "
          f"{len(manifest['shards'])} shards to {args.out} in {time.perf_counter() - start:.1f} s; "
          f"train with --set data.path={json.dumps(str(args.out))} (data.layout auto or 'webdataset')")
    return 0

