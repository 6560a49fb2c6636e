"""``simmim-fast visualize``: reconstruction PNG grids for a checkpoint, random or user masks.

The panels are described in ``simmim_fast.visualization`` (the training engine writes the same
grid every ``logging.visualize_every`` steps).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..masking import MaskGenerator
from ..visualization import save_reconstruction_grid, snap_mask
from .images import load_image, load_user_mask

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_weights_arguments
    add_weights_arguments(parser)
    parser.add_argument("--images", nargs="+", help="image files (default: 4 sample photos of scikit-image)")
    parser.add_argument("--mask", nargs="+", help="user mask PNG(s), white = hide: one for all images or one per "
                                                  "image; snapped to mask patches (default: a random mask)")
    parser.add_argument("--snap-size", type=int, help="snap user masks to squares of this many pixels "
                                                      "(default: mask.mask_patch_size of the config)")
    parser.add_argument("--snap-threshold", type=float, default=0.5,
                        help="a square is hidden when at least this fraction of it is white (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--scale", type=int, default=0, help="upscale panels by this integer factor "
                                                             "(default: enough for 128-px panels)")
    parser.add_argument("--output", "-o", default="reconstructions", help="output folder (one PNG per image)")
    parser.add_argument("--combined", help="write one PNG with a row per image to this path instead")
    parser.add_argument("--bands", help="model.in_chans > 3: the bands shown as red,green,blue, 1-based (e.g. 3,2,1; "
                                        "default the first three); 1 channel is shown as grey")


def _bands(text, in_chans: int):
    """--bands '3,2,1' (1-based) -> 0-based indices, or None for the default."""
    if text is None:
        return None
    try:
        bands = [int(b) - 1 for b in text.split(",")]
    except ValueError:
        raise UserError(f"--bands must be three band numbers like 3,2,1, got {text!r}") from None
    if len(bands) != 3 or not all(0 <= b < in_chans for b in bands):
        raise UserError(f"--bands {text}: three band numbers in 1..{in_chans} (model.in_chans) are needed")
    return bands


def main(args: argparse.Namespace) -> int:
    from ..data.samples import sample_photo_paths
    from ..weights import build_simmim, load_source

    from ..cli import output_location
    if args.combined:
        output_location(args.combined, "combined PNG")
    else:
        output_location(Path(args.output) / "x.png", "output folder")
    cfg, state = load_source(args.checkpoint, args.config, args.overrides)
    m = cfg.model
    if not args.images and (m.in_chans != 3 or cfg.data.value_range is not None):
        raise UserError(f"model.in_chans = {m.in_chans}: give --images (files with {m.in_chans} bands); the default "
                        f"sample photos are RGB")
    bands = _bands(args.bands, m.in_chans)
    image_paths = [Path(p) for p in (args.images or [str(p) for p in sample_photo_paths()[:4]])]
    masks = args.mask or []
    if masks and len(masks) not in (1, len(image_paths)):
        raise UserError(f"--mask: give one mask for all images or one per image ({len(image_paths)}), "
                         f"got {len(masks)}")
    snap = args.snap_size or cfg.mask.mask_patch_size
    if snap % m.patch_size or m.img_size % snap:
        raise UserError(f"--snap-size {snap} must be a multiple of model.patch_size ({m.patch_size}) and divide "
                         f"model.img_size ({m.img_size})")
    # de-normalised for display with the statistics recorded in the checkpoint's config
    images = torch.stack([load_image(p, m.img_size, cfg.data.mean, cfg.data.std, cfg.data.value_range)
                          for p in image_paths])
    model = build_simmim(cfg, state)
    scale = args.scale or max(1, -(-128 // m.img_size))
    out = Path(args.output)
    gen = MaskGenerator(m.img_size, cfg.mask.mask_patch_size, m.patch_size, cfg.mask.mask_ratio,
                        rng=np.random.default_rng(args.seed))
    tokens, drawings, snapped = [], [], []
    for p in image_paths:
        if masks:
            drawing = load_user_mask(masks[len(tokens) if len(masks) > 1 else 0], m.img_size, image_size_of=p)
            grid = snap_mask(drawing, snap, args.snap_threshold)
            if not grid.any():
                print(f"warning: the mask for {p.name} hides no {snap}-px square (threshold {args.snap_threshold})")
            tokens.append(grid.repeat(snap // m.patch_size, 0).repeat(snap // m.patch_size, 1))
            drawings.append(drawing)
            snapped.append(grid)
        else:
            tokens.append(gen())
    mask = torch.from_numpy(np.stack(tokens))
    extra = dict(drawings=np.stack(drawings), snapped=np.stack(snapped)) if masks else {}
    if args.combined:
        path = save_reconstruction_grid(model, images, mask, args.combined, cfg.data.mean, cfg.data.std, scale=scale,
                                        max_rows=len(image_paths), bands=bands, **extra)
        print(f"wrote {path}")
        return 0
    for i, p in enumerate(image_paths):
        one = {k: v[i:i + 1] for k, v in extra.items()}
        path = save_reconstruction_grid(model, images[i:i + 1], mask[i:i + 1], out / f"{p.stem}.png", cfg.data.mean,
                                        cfg.data.std, scale=scale, bands=bands, **one)
        print(f"wrote {path}")
    return 0
