"""``simmim-fast stats``: per-channel mean and std of a dataset, ready for data.mean / data.std.

    simmim-fast stats /data/s2_tiles --in-chans 4
    simmim-fast stats --config configs/my_run.json --limit 2000 --json

The pixels are read exactly as the torch loader reads them (whole images, before cropping and
normalisation), in its 0-1 value space: uint8 / 255, uint16 / 65535, floats as stored, or data.value_range's
mapping when the config sets one. Sums of x
and x^2 are accumulated per channel in float64, so memory stays constant whatever the dataset
size. Files the file index marks unusable, and files that fail to decode here, are skipped as the
loaders skip them, and counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
from torchvision.transforms import functional as TF

from ..cli import add_config_arguments
from ..config import load_config
from ..errors import UserError
from .index import BAD, TORCH_ONLY
from .loader import load_index
from .transforms import load_channels, load_rgb

__all__ = ["add_arguments", "main", "channel_stats"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="dataset (default: data.path of --config)")
    add_config_arguments(parser, help="config file whose data and model sections give the defaults")
    parser.add_argument("--in-chans", type=int, help="channels per image (default: model.in_chans of the config)")
    parser.add_argument("--limit", type=int, help="use a seeded random sample of this many files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of --set lines")


def channel_stats(paths, in_chans: int, value_range=None, arrays=None):
    """(mean, std, pixels, failures) per channel over every pixel of ``paths`` (population std), read as
    the torch loader reads them: 8-bit RGB for 3 channels without ``value_range`` (``arrays[k]`` True:
    path k is an array file, read by the band reader), else the bands as stored, mapped by ``value_range``."""
    s1 = np.zeros(in_chans, np.float64)
    s2 = np.zeros(in_chans, np.float64)
    n = 0
    failures = []
    rgb = in_chans == 3 and value_range is None
    for k, p in enumerate(paths):
        try:
            if rgb and not (arrays is not None and arrays[k]):
                x = TF.to_tensor(load_rgb(p))
            else:
                x = load_channels(p, in_chans, value_range)
        except Exception as e:  # noqa: BLE001 - skipped as the loaders skip it
            failures.append((str(p), f"{type(e).__name__}: {e}"))
            continue
        a = x.numpy().reshape(in_chans, -1).astype(np.float64)
        s1 += a.sum(1)
        s2 += (a * a).sum(1)
        n += a.shape[1]
    if n == 0:
        return None, None, 0, failures
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return mean.tolist(), std.tolist(), n, failures


def _config_in_chans(config: Optional[str], sets: List[str]) -> int:
    for s in reversed(sets):
        if s.startswith("model.in_chans="):
            return int(s.split("=", 1)[1])
    if config:
        return int(json.loads(Path(config).read_text()).get("model", {}).get("in_chans", 3))
    return 3


def main(args: argparse.Namespace) -> int:
    c = args.in_chans if args.in_chans is not None else _config_in_chans(args.config, args.overrides)
    if c < 1:
        raise UserError(f"--in-chans must be >= 1, got {c}")
    # data.mean / data.std are what this computes: placeholders of the right length let a config
    # that does not have them yet load.
    overrides = list(args.overrides) + [f"model.in_chans={c}", f"data.mean={[0.0] * c}", f"data.std={[1.0] * c}"]
    if args.path is not None:
        overrides.append(f"data.path={json.dumps(args.path)}")
    cfg = load_config(args.config, overrides=overrides)
    index = load_index(cfg, processes=True)
    ok = [i for i in range(len(index)) if index.status[i] != BAD]
    skipped = len(index) - len(ok)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        if args.limit < len(ok):
            ok = sorted(np.random.default_rng(args.seed).choice(ok, args.limit, replace=False).tolist())
    arrays = [TORCH_ONLY in index.notes.get(i, "") for i in ok]
    mean, std, n, failures = channel_stats([index.paths[i] for i in ok], c, cfg.data.value_range, arrays)
    if mean is None:
        raise UserError(f"no usable image among {len(index)} files of data.path = {cfg.data.path}")
    out = {"mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std], "in_chans": c,
           "files": len(ok) - len(failures), "pixels": n, "skipped": skipped + len(failures)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"# {out['files']} files, {n} pixels per channel, {out['skipped']} skipped; 0-1 value space")
        compact = dict(separators=(",", ":"))  # no spaces: the line pastes into a shell unquoted
        print(f"--set data.mean={json.dumps(out['mean'], **compact)} --set data.std={json.dumps(out['std'], **compact)}")
    for p, why in failures:
        print(f"stats: skipped {p}: {why}", file=sys.stderr)
    return 0
