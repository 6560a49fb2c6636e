"""HBM bytes model of one Swin block's attention section, forward + backward.

The section is what timm's ``SwinTransformerBlock._attn`` computes: from the normed map x
(B, H, W, C) to the output projection in the image layout (B, H, W, C). Two ways to compute it:

- ``timm_attention_bytes``: timm's eager path (roll, pad, window partition, qkv Linear, the
  reshape/permute copies, q*scale, QK^T, relative-position bias gather, + bias, + shift mask, softmax,
  attn@V, the head transpose, proj Linear, window reverse, roll back) and the backward autograd runs
  for it. One entry per aten op that moves data, in dispatch order, each counted as: every tensor
  argument read once in full (its distinct elements: a broadcast dimension counts once), every
  output written once; views are free. The ops are the ones eager PyTorch dispatches for timm's
  default path (``WindowAttention.fused_attn`` False: timm enables SDPA for Swin only with
  TIMM_FUSED_ATTN=2); ``tests/test_attention_bytes.py`` checks the list against a dispatch-mode count
  of the real timm block on the CPU, fp32 and bf16 autocast.
- ``fused_attention_bytes``: qkv Linear on the un-partitioned map, the bias gather, the fused
  ``window_attention`` op, proj Linear. The Linears and the gather are counted as for timm; the op
  is counted at its minimum: forward reads qkv and the bias once and writes the output and the fp32
  log-sum-exp (one per query row and head) once; backward reads grad_out, qkv, the bias, the output
  and the log-sum-exp once and writes d(qkv) and d(bias) once. Per-program partial sums of d(bias)
  (if the op keeps any) are not counted.

Dtypes: ``amp=True`` is bf16 autocast with fp32 parameters, as in training: x arrives in fp32 (the
LayerNorm before it runs in fp32 under autocast), the Linears and matmuls run in bf16 (autocast
casts their fp32 inputs first: those casts are entries too), the scores become fp32 when the fp32
bias is added, softmax runs in fp32. ``amp=False``: everything fp32.

The model describes eager execution. ``torch.compile`` fuses many of these ops, so a compiled timm
path moves fewer bytes than ``timm_attention_bytes`` says; nothing here models inductor's fusions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

Row = Tuple[str, int, int]  # (op, bytes read, bytes written)

FP32, BF16, INT64 = 4, 2, 8


@dataclass(frozen=True)
class AttnShape:
    """One block's attention geometry (window and shift as timm applies them)."""
    batch: int
    height: int
    width: int
    dim: int
    heads: int
    window: int
    shift: int

    def __post_init__(self):
        if self.height % self.window or self.width % self.window:
            raise ValueError(f"map {self.height}x{self.width} is not a multiple of window {self.window}: "
                             "timm pads such maps, which this model does not count")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.heads} heads")
        if not 0 <= self.shift < self.window:
            raise ValueError(f"shift {self.shift} must be in [0, window {self.window})")

    @property
    def tokens(self) -> int:          # T = B*H*W
        return self.batch * self.height * self.width

    @property
    def elems(self) -> int:           # E = T*C, one activation tensor
        return self.tokens * self.dim

    @property
    def n(self) -> int:               # N, tokens per window
        return self.window * self.window

    @property
    def windows_per_image(self) -> int:
        return (self.height // self.window) * (self.width // self.window)

    @property
    def scores(self) -> int:          # S = B*nW*heads*N*N = T*heads*N
        return self.tokens * self.heads * self.n

    @property
    def table_rows(self) -> int:      # (2*window - 1)^2 relative positions
        return (2 * self.window - 1) ** 2


def _linear_fwd(rows: List[Row], name: str, t: int, cin: int, cout: int, x_size: int, amp: bool, a: int) -> None:
    """nn.Linear on t rows of cin features, x of element size x_size; autocast casts its fp32 operands."""
    if amp:
        rows.append((f"{name}: cast bias to bf16", cout * FP32, cout * BF16))
        rows.append((f"{name}: cast weight to bf16", cout * cin * FP32, cout * cin * BF16))
        if x_size != a:
            rows.append((f"{name}: cast input to bf16", t * cin * x_size, t * cin * a))
    rows.append((f"{name}: addmm", cout * a + t * cin * a + cout * cin * a, t * cout * a))


def _linear_bwd(rows: List[Row], name: str, t: int, cin: int, cout: int, x_size: int, amp: bool, a: int) -> None:
    """Its backward: grad input, grad weight, grad bias, then autocast's casts back to the fp32 leaves."""
    rows.append((f"{name} bwd: mm grad input", t * cout * a + cout * cin * a, t * cin * a))
    rows.append((f"{name} bwd: mm grad weight", t * cout * a + t * cin * a, cout * cin * a))
    rows.append((f"{name} bwd: sum grad bias", t * cout * a, cout * a))
    if amp:
        if x_size != a:
            rows.append((f"{name} bwd: cast grad input to fp32", t * cin * a, t * cin * x_size))
        rows.append((f"{name} bwd: cast grad weight to fp32", cout * cin * a, cout * cin * FP32))
        rows.append((f"{name} bwd: cast grad bias to fp32", cout * a, cout * FP32))


def _bias_gather_fwd(rows: List[Row], s: AttnShape) -> None:
    nn_h = s.n * s.n * s.heads
    rows.append(("rel-pos bias: gather table[index]", s.table_rows * s.heads * FP32 + s.n * s.n * INT64, nn_h * FP32))
    if s.heads > 1:  # with one head the permuted gather is contiguous already
        rows.append(("rel-pos bias: permute(2, 0, 1).contiguous", nn_h * FP32, nn_h * FP32))


def _bias_gather_bwd(rows: List[Row], s: AttnShape) -> None:
    table = s.table_rows * s.heads * FP32
    rows.append(("rel-pos bias bwd: zeros for the table grad", 0, table))
    rows.append(("rel-pos bias bwd: index_put (accumulate)", table + s.n * s.n * INT64 + s.n * s.n * s.heads * FP32,
                 table))


def timm_attention_bytes(s: AttnShape, amp: bool = True) -> Dict[str, List[Row]]:
    """{"forward": rows, "backward": rows} for timm's eager ``SwinTransformerBlock._attn``."""
    a = BF16 if amp else FP32          # activations of the Linears / matmuls
    E, S, C = s.elems, s.scores, s.dim
    t, nw, shift = s.tokens, s.windows_per_image, s.shift > 0
    fwd: List[Row] = []
    if shift:
        fwd.append(("roll x", E * FP32, E * FP32))
    fwd.append(("pad x (a copy, even when nothing is padded)", E * FP32, E * FP32))
    # partition / reverse swap the (window row, windows along W) dims: a copy unless one is 1
    part = s.width // s.window > 1 and s.window > 1
    if part:
        fwd.append(("window partition copy", E * FP32, E * FP32))
    _linear_fwd(fwd, "qkv Linear", t, C, 3 * C, FP32, amp, a)
    # The (windows, heads) batch dims of the q, k, v views into the qkv buffer merge into one bmm
    # batch dim only without a copy when one of them is 1; the heads transpose after attn @ v is a
    # copy unless heads or N is 1; its backward gives the bmms a (windows, heads) view again.
    heads = s.heads > 1 and s.batch * nw > 1
    transpose = s.heads > 1 and s.n > 1
    transpose_bwd = heads and s.n > 1
    fwd.append(("q * scale", E * a, E * a))
    if heads:
        fwd.append(("q copy for bmm (batch dims do not merge)", E * a, E * a))
        fwd.append(("k^T copy for bmm", E * a, E * a))
    fwd.append(("bmm q k^T", 2 * E * a, S * a))
    _bias_gather_fwd(fwd, s)
    fwd.append(("scores + bias (fp32 result)", S * a + s.heads * s.n * s.n * FP32, S * FP32))
    if shift:
        fwd.append(("scores + shift mask", S * FP32 + nw * s.n * s.n * FP32, S * FP32))
    fwd.append(("softmax", S * FP32, S * FP32))
    if amp:
        fwd.append(("cast attn to bf16", S * FP32, S * a))
    if heads:
        fwd.append(("v copy for bmm", E * a, E * a))
    fwd.append(("bmm attn v", S * a + E * a, E * a))
    if transpose:
        fwd.append(("heads transpose copy", E * a, E * a))
    _linear_fwd(fwd, "proj Linear", t, C, C, a, amp, a)
    if part:
        fwd.append(("window reverse copy", E * a, E * a))
    if shift:
        fwd.append(("roll back", E * a, E * a))

    bwd: List[Row] = []
    if shift:
        bwd.append(("roll back bwd", E * a, E * a))
    if part:
        bwd.append(("window reverse bwd copy", E * a, E * a))
    _linear_bwd(bwd, "proj Linear", t, C, C, a, amp, a)
    if transpose_bwd:
        bwd.append(("heads transpose bwd copy", E * a, E * a))
    bwd.append(("bmm attn v bwd: grad v", S * a + E * a, E * a))
    bwd.append(("bmm attn v bwd: grad attn", 2 * E * a, S * a))
    if amp:
        bwd.append(("cast grad attn to fp32", S * a, S * FP32))
    bwd.append(("softmax bwd", 2 * S * FP32, S * FP32))
    if amp:
        bwd.append(("cast grad scores to bf16", S * FP32, S * a))
    if s.batch * nw > 1:  # broadcast over windows: autograd sums the grad back to (1, heads, N, N)
        bwd.append(("sum grad bias over windows", S * FP32, s.heads * s.n * s.n * FP32))
    _bias_gather_bwd(bwd, s)
    bwd.append(("bmm q k^T bwd: grad k^T", E * a + S * a, E * a))
    bwd.append(("bmm q k^T bwd: grad q", S * a + E * a, E * a))
    bwd.append(("q * scale bwd", E * a, E * a))
    bwd.append(("stack grad q, k, v", 3 * E * a, 3 * E * a))
    bwd.append(("qkv permute bwd copy", 3 * E * a, 3 * E * a))
    _linear_bwd(bwd, "qkv Linear", t, C, 3 * C, FP32, amp, a)
    if part:
        bwd.append(("window partition bwd copy", E * FP32, E * FP32))
    bwd.append(("pad bwd copy", E * FP32, E * FP32))
    if shift:
        bwd.append(("roll x bwd", E * FP32, E * FP32))
    return {"forward": fwd, "backward": bwd}


def fused_attention_bytes(s: AttnShape, amp: bool = True, bias_size: int = FP32) -> Dict[str, List[Row]]:
    """{"forward": rows, "backward": rows} for qkv Linear -> window_attention -> proj Linear."""
    a = BF16 if amp else FP32
    E, C, t = s.elems, s.dim, s.tokens
    bias = s.heads * s.n * s.n * bias_size
    lse = t * s.heads * FP32
    fwd: List[Row] = []
    _linear_fwd(fwd, "qkv Linear", t, C, 3 * C, FP32, amp, a)
    _bias_gather_fwd(fwd, s)
    fwd.append(("window_attention fwd (reads qkv, bias; writes out, log-sum-exp)", 3 * E * a + bias, E * a + lse))
    _linear_fwd(fwd, "proj Linear", t, C, C, a, amp, a)
    bwd: List[Row] = []
    _linear_bwd(bwd, "proj Linear", t, C, C, a, amp, a)
    bwd.append(("window_attention bwd (reads grad out, qkv, bias, out, log-sum-exp; writes d qkv, d bias)",
                E * a + 3 * E * a + bias + E * a + lse, 3 * E * a + bias))
    _bias_gather_bwd(bwd, s)
    _linear_bwd(bwd, "qkv Linear", t, C, 3 * C, FP32, amp, a)
    return {"forward": fwd, "backward": bwd}


MODELS: Dict[str, Callable[..., Dict[str, List[Row]]]] = {"timm": timm_attention_bytes,
                                                          "fused": fused_attention_bytes}


def total(rows: Dict[str, List[Row]]) -> int:
    """Bytes read + written over forward and backward."""
    return sum(r + w for part in rows.values() for _, r, w in part)


def summary(rows: Dict[str, List[Row]]) -> Dict[str, int]:
    out = {}
    for part, entries in rows.items():
        out[f"{part}_read"] = sum(r for _, r, _ in entries)
        out[f"{part}_written"] = sum(w for _, _, w in entries)
    out["total"] = total(rows)
    return out


def swin_block_shapes(img_size: int, patch_size: int, embed_dim: int, depths, num_heads, window_size: int,
                      batch: int) -> List[Tuple[int, int, AttnShape]]:
    """(stage, block, shape) for every block of a timm Swin (always_partition=False) at ``img_size``:
    odd blocks are shifted by window // 2, and a stage whose map is not larger than the window uses
    one window of the whole map, unshifted."""
    out = []
    side = img_size // patch_size
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
        if stage:
            side //= 2
        dim = embed_dim * 2 ** stage
        window = min(window_size, side)
        for block in range(depth):
            shift = 0 if side <= window_size or block % 2 == 0 else window_size // 2
            out.append((stage, block, AttnShape(batch, side, side, dim, heads, window, shift)))
    return out
