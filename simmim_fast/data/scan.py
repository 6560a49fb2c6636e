"""``simmim-fast scan``: check a dataset up front and report the files training would skip.

    simmim-fast scan /data/imagenet/train                 # header check, all cores
    simmim-fast scan --config configs/swin_b.json --check decode --list bad.tsv

It builds the same file index the loader uses (and caches it, so the first training run starts
without re-checking), then prints what training would do with every file: use it as is, convert
it to RGB on the way, or skip it (with the reason). Exit status 0, or 1 with ``--strict`` when
any file would be skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from ..cli import add_config_arguments
from ..errors import UserError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="an ImageFolder tree, a flat folder of images or a text file "
                                                "listing images (default: data.path of --config, else the "
                                                "scikit-image sample photos)")
    add_config_arguments(parser, help="config file whose data section gives the defaults")
    parser.add_argument("--layout", choices=["auto", "imagefolder", "flat", "filelist", "webdataset"],
                        help="data.layout")
    parser.add_argument("--check", choices=["header", "decode"],
                        help="'header' (fast) or 'decode' (decode every file once); default data.check")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument("--cache-dir", help="data.cache_dir (where the index is cached)")
    parser.add_argument("--min-side", type=int, help="data.min_image_side")
    parser.add_argument("--list", type=Path, metavar="FILE", help="write every skipped file as path<TAB>reason")
    parser.add_argument("--show", type=int, default=20, help="skipped files to print (default 20)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any file would be skipped")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..config import load_config

    from .index import BAD
    from .loader import band_channels, load_index

    overrides = list(args.overrides)
    for key, value in (("path", args.path), ("layout", args.layout), ("check", args.check),
                       ("cache_dir", args.cache_dir), ("min_image_side", args.min_side)):
        if value is not None:
            overrides.append(f"data.{key}={value}" if key != "path" else f"data.path={_json_str(value)}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_config(args.config, overrides=overrides)
    d = cfg.data
    where = d.path if d.path is not None else "the scikit-image sample photos"

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rscan: checked {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    index = load_index(cfg, workers=args.workers, processes=True, progress=progress)
    n = len(index)
    bad = index.bad
    print(f"scanned {n} files in {where} (check: {d.check}; {index.checked} checked in {index.seconds:.1f} s, "
          f"{n - index.checked} unchanged since the cached index)")
    notes = Counter(note for i, text in index.notes.items() if index.status[i] != BAD for note in text.split("; "))
    kept = band_channels(cfg) is not None  # bands read as stored, not converted to RGB
    print(f"  usable: {n - len(bad)}" + ((", of which:" if kept else ", converted to 8-bit RGB on the way:")
                                         if notes else ""))
    for note, count in notes.most_common():
        print(f"    {count} {note}")
    usable = index.status != BAD
    small = int((usable & (np.minimum(index.width, index.height) < cfg.model.img_size)).sum())
    if small:
        print(f"    {small} with a shorter side below model.img_size = {cfg.model.img_size} px: upsampled by the "
              f"crop-resize (data.min_image_side = N skips such files)")
    print(f"  would skip: {len(bad)}" + (f" ({100 * len(bad) / n:.2f}%)" if n else ""))
    for reason, count in Counter(_reason_kind(index.reasons[int(i)]) for i in bad).most_common():
        print(f"    {count} {reason}")
    for i in bad[:max(0, args.show)]:
        print(f"    {index.paths[i]}: {index.reasons[int(i)]}")
    if len(bad) > args.show:
        print(f"    ... and {len(bad) - args.show} more" + ("" if args.list else " (--list FILE writes them all)"))
    if len(bad) > d.max_skipped_fraction * n:
        print(f"  training would refuse to start: more than data.max_skipped_fraction = {d.max_skipped_fraction} "
              f"of the files are unusable")
    if args.list:
        with open(args.list, "w") as f:
            f.write("path\treason\n")
            for i in bad:
                f.write(f"{index.paths[i]}\t{index.reasons[int(i)]}\n")
        print(f"  skipped files written to {args.list}")
    if index.cache_file is not None:
        print(f"  index cached in {index.cache_file}")
    return 1 if args.strict and len(bad) else 0


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


def _json_str(s: str) -> str:
    import json
    return json.dumps(s)
