"""Which view of an image each sample gets: RandomResizedCrop box, flips and 90-degree turns, vectorised
and seeded.

Every backend draws a sample's view from the same counter-based generator keyed by (seed, epoch,
slot), where the slot is the sample's index in the dataset; the image size comes from the file
index. So a sample has the same crop and flip whatever the backend, worker, rank or resume
point, and a whole batch of views costs a few numpy operations (no per-image Python loop, no
per-image generator object), which keeps the GPU pipeline free of per-image CPU work.

The box follows torchvision's RandomResizedCrop.get_params exactly (ten tries of an area
fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, rounded half to even;
a centre crop clamped to the ratio range if no try fits), with every try's draws taken up front
so that the draws of a sample never depend on another sample. The vertical flip and the
90-degree rotation (data.vflip_prob, data.rot90: overhead imagery has no up) use draws after
those, so enabling them leaves every crop box and horizontal flip as it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from ..errors import UserError

__all__ = ["Views", "sample_uniforms", "sample_views", "NUM_TRIES"]

NUM_TRIES = 10
# Draw slots per sample: NUM_TRIES area fractions, NUM_TRIES log aspect ratios, top, left, flip.
_AREA, _RATIO = 0, NUM_TRIES
_TOP, _LEFT, _FLIP = 2 * NUM_TRIES, 2 * NUM_TRIES + 1, 2 * NUM_TRIES + 2
NUM_DRAWS = 2 * NUM_TRIES + 3
_VFLIP, _ROT90 = NUM_DRAWS, NUM_DRAWS + 1  # drawn only when enabled

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_VIEWS = 0x56494557  # distinguishes view draws from any other stream keyed by the same seed


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche mix of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _u64(values) -> np.ndarray:
    # Masking keeps negative or huge Python ints well defined; arrays (not numpy scalars) wrap silently.
    return np.asarray([int(v) & 0xFFFFFFFFFFFFFFFF for v in values], dtype=np.uint64)


def sample_uniforms(seed: int, epoch: int, slots: Sequence[int] | np.ndarray, num_draws: int,
                    stream: int = _STREAM_VIEWS) -> np.ndarray:
    """(len(slots), num_draws) float64 uniforms in [0, 1), a pure function of (stream, seed, epoch, slot, draw).

    Each slot gets a splitmix64 sequence whose state is a hash of (stream, seed, epoch, slot).
    """
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):
        key = _mix64(_u64([stream]) + _GOLDEN)
        key = _mix64(key ^ (_u64([seed]) * _GOLDEN))
        key = _mix64(key ^ (_u64([epoch]) + _GOLDEN))
        state = _mix64(key ^ (slots.astype(np.uint64) * _GOLDEN))
        counters = (np.arange(1, num_draws + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix64(state[:, None] + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Views:
    """One view per sample: crop box (top, left, height, width) in source pixels, a flip flag, and
    (None when not enabled) a vertical flip flag and a count of 90-degree counter-clockwise turns."""
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray
    vflip: Optional[np.ndarray] = None
    rot90: Optional[np.ndarray] = None

    def turns(self, i: int) -> Tuple[bool, int]:
        """(vertical flip, 90-degree turns) of sample i, applied after the crop-resize and horizontal flip."""
        return (bool(self.vflip[i]) if self.vflip is not None else False,
                int(self.rot90[i]) if self.rot90 is not None else 0)

    def __len__(self) -> int:
        return len(self.top)

    def __getitem__(self, i: int) -> Tuple[int, int, int, int, bool]:
        return int(self.top[i]), int(self.left[i]), int(self.height[i]), int(self.width[i]), bool(self.flip[i])


def crop_boxes(widths: np.ndarray, heights: np.ndarray, draws: np.ndarray, scale: Tuple[float, float],
               ratio: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop boxes for images of the given sizes, from draws laid out as NUM_DRAWS columns."""
    W = np.asarray(widths, dtype=np.int64)
    H = np.asarray(heights, dtype=np.int64)
    area = (W * H).astype(np.float64)[:, None]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[:, _AREA:_AREA + NUM_TRIES])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * draws[:, _RATIO:_RATIO + NUM_TRIES])
    w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)  # rint = Python's round: half to even
    h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(W))
    bw, bh = w[rows, first], h[rows, first]
    top = np.floor(draws[:, _TOP] * (H - bh + 1)).astype(np.int64)
    left = np.floor(draws[:, _LEFT] * (W - bw + 1)).astype(np.int64)
    # No try fits: torchvision's fallback, the whole image clamped to the ratio range, centred.
    none_fit = ~fits.any(axis=1)
    if none_fit.any():
        Wn, Hn = W[none_fit], H[none_fit]
        in_ratio = Wn / Hn
        lo, hi = min(ratio), max(ratio)
        fw = np.where(in_ratio < lo, Wn, np.where(in_ratio > hi, np.rint(Hn * hi), Wn)).astype(np.int64)
        fh = np.where(in_ratio < lo, np.rint(Wn / lo), Hn).astype(np.int64)
        bw, bh, top, left = bw.copy(), bh.copy(), top.copy(), left.copy()
        bw[none_fit], bh[none_fit] = fw, fh
        top[none_fit], left[none_fit] = (Hn - fh) // 2, (Wn - fw) // 2
    return top, left, bh, bw


def sample_views(seed: int, epoch: int, slots: Sequence[int] | np.ndarray, widths, heights,
                 scale: Tuple[float, float], ratio: Tuple[float, float], hflip_prob: float,
                 vflip_prob: float = 0.0, rot90: bool = False) -> Views:
    """The views of ``slots`` at ``epoch`` for images of the given (width, height)."""
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    if not len(widths) == len(heights) == len(np.asarray(slots).reshape(-1)):
        raise UserError(f"sample_views: {len(np.asarray(slots).reshape(-1))} slots but {len(widths)} widths "
                         f"and {len(heights)} heights")
    if len(widths) and (widths.min() < 1 or heights.min() < 1):
        raise UserError("sample_views: image widths and heights must be >= 1")
    extra = vflip_prob > 0 or rot90
    draws = sample_uniforms(seed, epoch, slots, NUM_DRAWS + 2 if extra else NUM_DRAWS)
    top, left, h, w = crop_boxes(widths, heights, draws, scale, ratio)
    vflip = draws[:, _VFLIP] < vflip_prob if extra else None
    turns = np.floor(draws[:, _ROT90] * 4).astype(np.int64) if rot90 else None
    return Views(top, left, h, w, draws[:, _FLIP] < hflip_prob, vflip, turns)
