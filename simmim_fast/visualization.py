"""Reconstruction grids: what a SimMIM model reconstructs, as PNG panels.

One row per image, panels left to right: the original, the masked input (hidden patches grey),
the raw reconstruction, and the reconstruction pasted into the hidden patches only (visible
patches are the original pixels). For a user mask a fifth panel shows how the drawing was snapped
to mask patches: the drawing in red over the dimmed image, the snapped patches outlined in yellow.

Used by the training engine (every ``logging.visualize_every`` steps) and by ``simmim-fast
visualize``; depends on the model only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .models import denormalize_targets
from .errors import UserError

__all__ = ["reconstruction_panels", "reconstruction_grid", "render_grid", "save_reconstruction_grid", "snap_mask",
           "to_uint8_rgb", "save_png_atomically", "PANEL_GAP"]

PANEL_GAP = 2          # px between panels and rows (white)
LABEL_HEIGHT = 12      # px of the caption strip, drawn only when panels are wide enough for it
_LABEL_MIN_WIDTH = 96
_LABELS = ["original", "masked input", "reconstruction", "rec. in hidden", "mask -> snapped"]


def snap_mask(user_mask: np.ndarray, snap_size: int, threshold: float = 0.5) -> np.ndarray:
    """(S, S) drawing in [0, 1] -> (S/snap, S/snap) int grid: a cell is hidden when at least
    ``threshold`` of its pixels are white (>= 0.5)."""
    s = user_mask.shape[0]
    if user_mask.ndim != 2 or user_mask.shape[1] != s:
        raise UserError(f"snap_mask: the drawing must be square (S, S), got {user_mask.shape}")
    if s % snap_size:
        raise UserError(f"snap_mask: image size {s} is not divisible by the snap size {snap_size}")
    if not 0 < threshold <= 1:
        raise UserError(f"snap_mask: threshold must be in (0, 1], got {threshold}")
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
                          mean: Sequence[float], std: Sequence[float],
                          bands: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
    """uint8 RGB panels (B, H, W, 3): 'original', 'masked', 'reconstruction', 'pasted'; and
    'pixel_mask' (B, H, W) bool, True = hidden. ``bands``: see to_uint8_rgb."""
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
    original = to_uint8_rgb(images, mean, std, bands)
    reconstruction = to_uint8_rgb(rec, mean, std, bands)
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


def reconstruction_grid(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float], scale: int = 1, drawings: Optional[np.ndarray] = None,
                        snapped: Optional[np.ndarray] = None, max_rows: int = 8,
                        bands: Optional[Sequence[int]] = None) -> Image.Image:
    """The grid as a PIL image: a row of panels per image (at most ``max_rows``).

    ``model`` is a SimMIM model (DeepSpeed / DDP / compiled wrappers are unwrapped), ``images``
    (B, C, S, S) normalised (``bands``: which 3 of C are shown as RGB, see to_uint8_rgb), ``mask`` the token mask (B, S/p, S/p). It runs in eval mode without
    gradients and restores the model's mode. ``drawings`` (B, S, S) and ``snapped`` (B, g, g) add
    the snapping panel for user masks.
    """
    if images.dim() != 4:
        raise UserError(f"reconstruction_grid: images must be (B, C, S, S), got {tuple(images.shape)}")
    if mask.dim() != 3 or mask.shape[0] != images.shape[0]:
        raise UserError(f"reconstruction_grid: mask must be (B, S/p, S/p) for images {tuple(images.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise UserError(f"reconstruction_grid: scale must be a positive int, got {scale!r}")
    n = min(images.shape[0], max_rows)
    panels = reconstruction_panels(model, images[:n], mask[:n], mean, std, bands)
    rows = []
    for i in range(n):
        row = [panels[k][i] for k in ("original", "masked", "reconstruction", "pasted")]
        if drawings is not None and snapped is not None:
            row.append(_snap_panel(panels["original"][i], drawings[i], snapped[i]))
        rows.append(row)
    return render_grid(rows, scale, _LABELS)


def save_png_atomically(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_reconstruction_grid(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, path: str | Path,
                             mean: Sequence[float], std: Sequence[float], **kwargs) -> Path:
    """``reconstruction_grid(...)`` written to ``path`` (PNG). Returns the path."""
    return save_png_atomically(reconstruction_grid(model, images, mask, mean, std, **kwargs), path)


def to_uint8_rgb(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 bands: Optional[Sequence[int]] = None) -> np.ndarray:
    """(B, C, H, W) normalised tensor -> (B, H, W, 3) uint8 RGB, de-normalised and clipped.

    C = 3: the image. C = 1 (or 2, without ``bands``): band 0 as grey. More than 3 bands: a
    false-colour composite of ``bands`` (0-based indices shown as red, green, blue; default the first
    three), each band de-normalised with its own mean/std.
    """
    if x.dim() != 4:
        raise UserError(f"to_uint8_rgb: expected (B, C, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise UserError(f"to_uint8_rgb: {c} channels but {len(mean)} mean / {len(std)} std values")
    if bands is None:
        bands = (0, 1, 2) if c >= 3 else (0, 0, 0)
    bands = [int(b) for b in bands]
    if len(bands) != 3 or not all(0 <= b < c for b in bands):
        raise UserError(f"to_uint8_rgb: bands {bands} must be 3 indices in [0, {c})")
    m = torch.tensor([float(mean[b]) for b in bands], dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor([float(std[b]) for b in bands], dtype=torch.float32).view(1, 3, 1, 1)
    rgb = (x.detach().float().cpu()[:, bands] * s + m).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
