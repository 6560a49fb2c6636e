"""Reading WebDataset shards written by ``simmim-fast shard`` (shard.py): random access by member.

A shard folder holds ``shard-NNNNNN.tar`` files (POSIX ustar, one member per sample, named
``<key>.<ext>`` with the source file's bytes), DALI's index file beside each (``shard-NNNNNN.idx``,
the ``v1.2`` format of DALI's ``wds2idx``: a ``v1.2 <samples>`` line, then one
``<ext> <offset> <size> <name>`` line per sample, offset = start of the member's data) and a
``manifest.json`` (sample count, per-shard sample counts, byte sizes and SHA-256 checksums).

The loaders do not stream the tars: each sample is a ``Member`` (shard, data offset, size), read
with one ``pread``, so the sampler, the per-sample views, bad-file stand-ins and exact mid-epoch
resume work exactly as for a folder of files, and sample i of the shards is file i of the sorted
folder they were made from. Each shard's checksum is verified once (the result is cached in
data.cache_dir by the shard's size and modification time); a shard whose checksum no longer
matches is listed again member by member from its tar headers (resynchronising on the next valid
header after a damaged one), with a warning, so one bad member does not cost the shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import MissingFileError, UserError

__all__ = ["MANIFEST", "FORMAT", "INDEX_VERSION", "Member", "MemberIO", "MemberTable", "open_source",
           "source_suffix", "source_key", "is_shard_dataset", "open_shards", "read_idx", "scan_tar", "sha256_file"]

log = logging.getLogger("simmim_fast.data")

MANIFEST = "manifest.json"
FORMAT = "simmim-fast webdataset"
INDEX_VERSION = "v1.2"  # DALI's wds2idx index format with member names
BLOCK = 512
_MISSING = -1


class Member(NamedTuple):
    """One sample of a shard: ``size`` bytes at ``offset`` in the tar file ``shard`` (offset -1: missing)."""
    shard: str
    offset: int
    size: int
    name: str

    @property
    def suffix(self) -> str:
        return "." + self.name.split(".", 1)[1].lower() if "." in self.name else ""

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def read(self) -> bytes:
        if self.offset < 0:
            raise OSError(f"member {self.name} is missing from the damaged shard {self.shard}")
        with open(self.shard, "rb") as f:
            data = os.pread(f.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"member {self.name} of {self.shard}: read {len(data)} of {self.size} bytes (shard cut off)")
        return data


class MemberIO(io.RawIOBase):
    """A seekable read-only file over one member's bytes (what PIL, tifffile and numpy open)."""

    def __init__(self, member: Member):
        super().__init__()
        if member.offset < 0:
            raise OSError(f"member {member.name} is missing from the damaged shard {member.shard}")
        self._f = open(member.shard, "rb")
        self._start, self._size, self._pos = member.offset, member.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_source(src) -> BinaryIO:
    """A binary file object for a sample: a file path, or a shard ``Member``."""
    return io.BufferedReader(MemberIO(src)) if isinstance(src, Member) else open(src, "rb")


def source_suffix(src) -> str:
    return src.suffix if isinstance(src, Member) else Path(src).suffix.lower()


def source_key(src) -> str:
    """A string that changes when the sample's bytes may have changed (for caches of derived files)."""
    if isinstance(src, Member):
        st = os.stat(src.shard)
        return f"{src}|{src.offset}|{src.size}|{st.st_size}|{st.st_mtime_ns}"
    st = os.stat(src)
    return f"{src}|{st.st_size}|{st.st_mtime_ns}"


class MemberTable(Sequence[Member]):
    """Every sample of a shard dataset, packed in arrays (~30 bytes a sample plus its name)."""

    def __init__(self, shards: Sequence[str], members: Sequence[Tuple[int, int, int, str]],
                 missing_reasons: Optional[Dict[int, str]] = None):
        self.shards = [str(s) for s in shards]
        self.shard_id = np.array([m[0] for m in members], dtype=np.int32)
        self.offset = np.array([m[1] for m in members], dtype=np.int64)
        self.size = np.array([m[2] for m in members], dtype=np.int64)
        encoded = [m[3].encode("utf-8", "surrogateescape") for m in members]
        self._name_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._name_offsets[1:])
        self._names = b"".join(encoded)
        self.missing_reasons = dict(missing_reasons or {})  # sample -> why it cannot be read at all

    def __len__(self) -> int:
        return len(self.shard_id)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        i %= len(self)
        name = self._names[self._name_offsets[i]:self._name_offsets[i + 1]].decode("utf-8", "surrogateescape")
        return Member(self.shards[self.shard_id[i]], int(self.offset[i]), int(self.size[i]), name)

    def stats(self) -> List[Tuple[int, int]]:
        """(size, mtime) per sample for the file index cache: the member size and its shard's mtime."""
        mtimes = []
        for s in self.shards:
            try:
                mtimes.append(os.stat(s).st_mtime_ns)
            except OSError:
                mtimes.append(-1)
        return [(int(sz), mtimes[sid]) if off >= 0 else (-1, -1)
                for sid, off, sz in zip(self.shard_id, self.offset, self.size)]


# ---------------------------------------------------------------------------------------------
def manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / MANIFEST if p.is_dir() else p


def is_shard_dataset(path: str | os.PathLike) -> bool:
    """True for a folder holding a shard manifest, or the manifest file itself."""
    p = manifest_path(path)
    if not p.is_file() or p.suffix.lower() != ".json":
        return False
    try:
        with open(p, "rb") as f:
            return json.loads(f.read(1 << 20) or b"{}").get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(path: str | os.PathLike) -> Tuple[Path, dict]:
    p = manifest_path(path)
    if not p.is_file():
        raise MissingFileError(f"data.layout is 'webdataset' but there is no {MANIFEST} at {p} (make shards with "
                               f"`simmim-fast shard SRC OUT`)")
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"shard manifest {p} is not readable JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise UserError(f"{p} is not a shard manifest written by `simmim-fast shard` (format {FORMAT!r})")
    for k, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"tar", "idx", "samples", "bytes", "sha256"} <= set(s):
            raise UserError(f"shard manifest {p}: entry {k} of 'shards' lacks tar/idx/samples/bytes/sha256")
    if sum(int(s["samples"]) for s in m["shards"]) != int(m.get("samples", -1)):
        raise UserError(f"shard manifest {p}: 'samples' = {m.get('samples')} is not the sum of the shards' counts")
    return p.parent, m


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_idx(path: Path) -> List[Tuple[str, int, int]]:
    """(name, data offset, size) of each sample in a DALI index file (the first component of each line)."""
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise ValueError(f"{path}: first line is not '<version> <samples>'")
    n = int(head[1])
    out = []
    for k, line in enumerate(lines[1:n + 1]):
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{path} line {k + 2}: expected '<ext> <offset> <size> <name>'")
        ext, offset, size = parts[0], int(parts[1]), int(parts[2])
        name = parts[3] if head[0] == INDEX_VERSION and len(parts) >= 4 else f"{k:08d}.{ext}"
        if offset % BLOCK:
            raise ValueError(f"{path} line {k + 2}: offset {offset} is not a multiple of {BLOCK}")
        out.append((name, offset, size))
    if len(out) != n:
        raise ValueError(f"{path}: {len(out)} sample lines, the header says {n}")
    return out


def _parse_header(h: bytes) -> Optional[Tuple[str, int, bytes]]:
    """(name, size, type flag) of a valid ustar header block, else None (bad checksum or magic)."""
    if h[257:262] != b"ustar":
        return None
    try:
        stored = int(h[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(h[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
        return None
    name = h[0:100].split(b"\0", 1)[0]
    prefix = h[345:500].split(b"\0", 1)[0]
    full = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
    return full, size, h[156:157]


def scan_tar(path: Path) -> List[Tuple[str, int, int]]:
    """(name, data offset, size) of every regular member found by walking the tar's headers.

    A block that is not a valid header (damaged bytes) is stepped over one block at a time until
    the next valid header, so the members after a damaged one are still found."""
    out = []
    total = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as f:
        while pos + BLOCK <= total:
            h = os.pread(f.fileno(), BLOCK, pos)
            parsed = _parse_header(h) if h.strip(b"\0") else None
            if parsed is None:
                pos += BLOCK
                continue
            name, size, kind = parsed
            if kind in (b"0", b"\0") and pos + BLOCK + size <= total:
                out.append((name, pos + BLOCK, size))
            pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out


def _checksum_cache(cache_dir: Optional[Path], folder: Path) -> Optional[Path]:
    if cache_dir is None:
        return None
    digest = hashlib.sha1(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return Path(cache_dir) / "shards" / f"{digest}.json"


def _verify(shards: List[dict], folder: Path, cache_file: Optional[Path], workers: int) -> List[bool]:
    """Whether each shard's size and SHA-256 match the manifest (hashes cached by size and mtime)."""
    cached: Dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    stats = []
    for s in shards:
        st = os.stat(folder / s["tar"])
        stats.append((st.st_size, st.st_mtime_ns))

    def digest(k: int) -> str:
        tar = str(folder / shards[k]["tar"])
        row = cached.get(tar)
        if row and row[0] == stats[k][0] and row[1] == stats[k][1]:
            return row[2]
        return sha256_file(tar)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(digest, range(len(shards))))
    if cache_file is not None:
        new = {str(folder / s["tar"]): [stats[k][0], stats[k][1], digests[k]] for k, s in enumerate(shards)}
        if new != cached:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(new))
                os.replace(tmp, cache_file)
            except OSError as e:
                log.warning("data: could not cache shard checksums in %s (%s)", cache_file, e)
    return [stats[k][0] == int(s["bytes"]) and digests[k] == s["sha256"] for k, s in enumerate(shards)]


def open_shards(path: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None,
                workers: int = 4) -> MemberTable:
    """Every sample of the shard dataset at ``path`` (its folder or manifest), in the order it was sharded."""
    folder, manifest = load_manifest(path)
    folder = folder.resolve()
    shards = manifest["shards"]
    if not shards:
        raise UserError(f"shard manifest {folder / MANIFEST} lists no shards")
    for s in shards:
        if not (folder / s["tar"]).is_file():
            raise MissingFileError(f"shard {folder / s['tar']} listed in {folder / MANIFEST} does not exist")
    intact = _verify(shards, folder, _checksum_cache(Path(cache_dir) if cache_dir else None, folder), workers)
    members: List[Tuple[int, int, int, str]] = []
    missing: Dict[int, str] = {}
    for k, (s, ok) in enumerate(zip(shards, intact)):
        tar, idx = folder / s["tar"], folder / s["idx"]
        expected: Optional[List[Tuple[str, int, int]]] = None
        try:
            expected = read_idx(idx)
        except (OSError, ValueError) as e:
            log.warning("data: shard index %s unusable (%s); listing %s from its tar headers", idx, e, tar)
        if expected is not None and len(expected) != int(s["samples"]):
            log.warning("data: shard index %s lists %d samples, %s says %d; listing %s from its tar headers", idx,
                        len(expected), MANIFEST, s["samples"], tar)
            expected = None
        if ok and expected is not None:
            entries = [(k, off, size, name) for name, off, size in expected]
        else:
            found = scan_tar(tar)
            if not ok:
                log.warning("data: shard %s no longer matches the checksum in %s: reading it member by member "
                            "(%d members found by their tar headers, %s expected)", tar, MANIFEST, len(found),
                            s["samples"])
            if expected is None:
                if len(found) != int(s["samples"]):
                    raise UserError(f"shard {tar} is damaged: its index is unusable and {len(found)} members were "
                                    f"found where {MANIFEST} says {s['samples']}; make the shards again with "
                                    f"`simmim-fast shard`")
                entries = [(k, off, size, name) for name, off, size in found]
            else:
                where = {name: (off, size) for name, off, size in found}
                entries = []
                for name, _off, size in expected:
                    off_size = where.get(name)
                    if off_size is None:
                        missing[len(members) + len(entries)] = ("member missing from damaged shard (its tar header "
                                                                "is unreadable)")
                        entries.append((k, _MISSING, size, name))
                    else:
                        entries.append((k, off_size[0], off_size[1], name))
        members += entries
    return MemberTable([str(folder / s["tar"]) for s in shards], members, missing)
