"""``simmim-fast visualize``: what the model reconstructs, as PNG grids.

One row per image, panels left to right: the original, the masked input (hidden patches grey),
the raw reconstruction, and the reconstruction pasted into the hidden patches only (visible
patches are the original pixels). With a user mask (``--mask``, white = hide) a fifth panel shows
how the drawing was snapped to mask patches: the drawing in red over the dimmed image, the
snapped patches outlined in yellow.

The training engine writes the same grid every ``logging.visualize_every`` steps through
:func:`save_reconstruction_grid`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..masking import MaskGenerator
from .images import load_image, load_user_mask, to_uint8_rgb

from .source import user_errors

__all__ = ["reconstruction_panels", "render_grid", "save_reconstruction_grid", "snap_mask", "denormalize_targets",
           "PANEL_GAP", "add_arguments", "main"]

PANEL_GAP = 2          # px between panels and rows (white)
LABEL_HEIGHT = 12      # px of the caption strip, drawn only when panels are wide enough for it
_LABEL_MIN_WIDTH = 96
_LABELS = ["original", "masked input", "reconstruction", "rec. in hidden", "mask -> snapped"]


def denormalize_targets(rec: torch.Tensor, images: torch.Tensor, window: int) -> torch.Tensor:
    """Inverse of ``normalize_targets``: back from locally normalised targets to the image space.

    Uses the local statistics of the full original image, hidden patches included (the model
    never sees them); this is for display only.
    """
    x = images.float()
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    n = F.avg_pool2d(torch.ones_like(x[:, :1]), window, stride=1, padding=pad, count_include_pad=True) * window ** 2
    var = ((mean_sq - mean ** 2) * (n / (n - 1))).clamp(min=0)
    return rec.float() * (var + 1e-6).sqrt() + mean


def snap_mask(user_mask: np.ndarray, snap_size: int, threshold: float = 0.5) -> np.ndarray:
    """(S, S) drawing in [0, 1] -> (S/snap, S/snap) int grid: a cell is hidden when at least
    ``threshold`` of its pixels are white (>= 0.5)."""
    s = user_mask.shape[0]
    if user_mask.ndim != 2 or user_mask.shape[1] != s:
        raise ValueError(f"snap_mask: the drawing must be square (S, S), got {user_mask.shape}")
    if s % snap_size:
        raise ValueError(f"snap_mask: image size {s} is not divisible by the snap size {snap_size}")
    if not 0 < threshold <= 1:
        raise ValueError(f"snap_mask: threshold must be in (0, 1], got {threshold}")
    g = s // snap_size
    cells = (user_mask >= 0.5).reshape(g, snap_size, g, snap_size).mean(axis=(1, 3))
    return (cells >= threshold).astype(np.int64)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DeepSpeed engines and DDP keep the model in .module; torch.compile in ._orig_mod.
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


@torch.no_grad()
def reconstruction_panels(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor,
                          mean: Sequence[float], std: Sequence[float]) -> Dict[str, np.ndarray]:
    """uint8 RGB panels (B, H, W, 3): 'original', 'masked', 'reconstruction', 'pasted'; and
    'pixel_mask' (B, H, W) bool, True = hidden."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = images.to(param.device)
        m = mask.to(param.device)
        rec = model.reconstruct(x.to(param.dtype), m).float()
    finally:
        model.train(was_training)
    if model.cfg.norm_targets:
        rec = denormalize_targets(rec, x, model.cfg.norm_targets_window)
    p = images.shape[-1] // mask.shape[-1]
    pixel_mask = mask.bool().cpu().repeat_interleave(p, 1).repeat_interleave(p, 2)
    original = to_uint8_rgb(images, mean, std)
    reconstruction = to_uint8_rgb(rec, mean, std)
    hidden = pixel_mask.numpy()[..., None]
    grey = np.full_like(original, 128)
    return {"original": original, "masked": np.where(hidden, grey, original),
            "reconstruction": reconstruction, "pasted": np.where(hidden, reconstruction, original),
            "pixel_mask": pixel_mask.numpy()}


def _snap_panel(original: np.ndarray, drawing: np.ndarray, grid: np.ndarray) -> np.ndarray:
    out = original.astype(np.float32) * 0.5
    red = np.array([255.0, 0.0, 0.0])
    drawn = (drawing >= 0.5)[..., None]
    out = np.where(drawn, 0.5 * out + 0.5 * red, out).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    cell = original.shape[0] // grid.shape[0]
    for gy, gx in zip(*np.nonzero(grid)):
        draw.rectangle([gx * cell, gy * cell, gx * cell + cell - 1, gy * cell + cell - 1], outline=(255, 230, 0))
    return np.asarray(img)


def render_grid(rows: List[List[np.ndarray]], scale: int = 1, labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile panels (each (H, W, 3) uint8) into one image: one row per list, PANEL_GAP white between
    panels and rows, nearest-neighbour upscaling by ``scale``, captions above when wide enough."""
    h, w = rows[0][0].shape[:2]
    ph, pw = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    top = LABEL_HEIGHT if labels and pw >= _LABEL_MIN_WIDTH else 0
    canvas = Image.new("RGB", (ncol * pw + (ncol - 1) * PANEL_GAP, top + len(rows) * ph + (len(rows) - 1) * PANEL_GAP),
                       (255, 255, 255))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            tile = Image.fromarray(panel)
            if scale != 1:
                tile = tile.resize((pw, ph), Image.NEAREST)
            canvas.paste(tile, (c * (pw + PANEL_GAP), top + r * (ph + PANEL_GAP)))
    if top:
        draw = ImageDraw.Draw(canvas)
        for c, text in enumerate(list(labels)[:ncol]):
            draw.text((c * (pw + PANEL_GAP) + 2, 0), text, fill=(0, 0, 0))
    return canvas


def save_reconstruction_grid(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, path: str | Path,
                             mean: Sequence[float], std: Sequence[float], scale: int = 1,
                             drawings: Optional[np.ndarray] = None, snapped: Optional[np.ndarray] = None,
                             max_rows: int = 8) -> Path:
    """Write one PNG: a row of panels per image (at most ``max_rows``). Returns the path.

    ``model`` is a SimMIM model (DeepSpeed / DDP / compiled wrappers are unwrapped), ``images``
    (B, 3, S, S) normalised, ``mask`` the token mask (B, S/p, S/p). It runs in eval mode without
    gradients and restores the model's mode. ``drawings`` (B, S, S) and ``snapped`` (B, g, g) add
    the snapping panel for user masks.
    """
    if images.dim() != 4:
        raise ValueError(f"save_reconstruction_grid: images must be (B, 3, S, S), got {tuple(images.shape)}")
    if mask.dim() != 3 or mask.shape[0] != images.shape[0]:
        raise ValueError(f"save_reconstruction_grid: mask must be (B, S/p, S/p) for images {tuple(images.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"save_reconstruction_grid: scale must be a positive int, got {scale!r}")
    n = min(images.shape[0], max_rows)
    panels = reconstruction_panels(model, images[:n], mask[:n], mean, std)
    rows = []
    for i in range(n):
        row = [panels[k][i] for k in ("original", "masked", "reconstruction", "pasted")]
        if drawings is not None and snapped is not None:
            row.append(_snap_panel(panels["original"][i], drawings[i], snapped[i]))
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_grid(rows, scale, _LABELS).save(path)
    return path


# --------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .source import add_source_arguments
    add_source_arguments(parser)
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


@user_errors
def main(args: argparse.Namespace) -> int:
    from ..data.samples import sample_photo_paths
    from .source import build_simmim, load_source

    cfg, state = load_source(args.checkpoint, args.config, args.overrides)
    m = cfg.model
    image_paths = [Path(p) for p in (args.images or [str(p) for p in sample_photo_paths()[:4]])]
    masks = args.mask or []
    if masks and len(masks) not in (1, len(image_paths)):
        raise SystemExit(f"--mask: give one mask for all images or one per image ({len(image_paths)}), "
                         f"got {len(masks)}")
    snap = args.snap_size or cfg.mask.mask_patch_size
    if snap % m.patch_size or m.img_size % snap:
        raise SystemExit(f"--snap-size {snap} must be a multiple of model.patch_size ({m.patch_size}) and divide "
                         f"model.img_size ({m.img_size})")
    images = torch.stack([load_image(p, m.img_size, cfg.data.mean, cfg.data.std) for p in image_paths])
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
                                        max_rows=len(image_paths), **extra)
        print(f"wrote {path}")
        return 0
    for i, p in enumerate(image_paths):
        one = {k: v[i:i + 1] for k, v in extra.items()}
        path = save_reconstruction_grid(model, images[i:i + 1], mask[i:i + 1], out / f"{p.stem}.png", cfg.data.mean,
                                        cfg.data.std, scale=scale, **one)
        print(f"wrote {path}")
    return 0
