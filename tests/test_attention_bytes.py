"""The HBM bytes model of the attention benchmark (benchmarks/attention_bytes.py).

1. One small shape counted by hand, entry by entry, for both paths.
2. The timm list against what eager PyTorch really dispatches for timm's SwinTransformerBlock._attn,
   forward + backward, fp32 and bf16 autocast, shifted and not: a TorchDispatchMode adds, for every
   aten op that is not a view, the distinct bytes of each tensor argument and of each output.
"""
import sys
from pathlib import Path

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from attention_bytes import (AttnShape, fused_attention_bytes, summary, swin_block_shapes,  # noqa: E402
                             timm_attention_bytes, total)

# ops that move nothing: views the schema does not declare as views, and allocations whose
# tensor argument only gives the shape
_FREE = {"aten._unsafe_view.default"}
_SHAPE_ONLY = {"aten.new_zeros.default", "aten.new_empty.default", "aten.zeros_like.default"}


def _distinct_bytes(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


class _CountBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if func.is_view or name in _FREE:
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        read = 0 if name in _SHAPE_ONLY else sum(_distinct_bytes(a) for a in ins)
        self.rows.append((name, read, sum(a.numel() * a.element_size() for a in outs)))
        return out


def _dispatched(s: AttnShape, amp: bool):
    torch.manual_seed(0)
    block = SwinTransformerBlock(s.dim, (s.height, s.width), s.heads, window_size=s.window, shift_size=s.shift,
                                 always_partition=False)
    assert block.window_size == (s.window, s.window) and block.shift_size == (s.shift, s.shift)
    assert not block.attn.fused_attn, "the model follows timm's default (non-SDPA) path"
    x = torch.randn(s.batch, s.height, s.width, s.dim, requires_grad=True)
    params = list(block.attn.parameters())
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        probe = block._attn(x)
    grad_out = torch.randn(probe.shape).to(probe.dtype)   # made outside the counter
    counter = _CountBytes()
    with counter:
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y = block._attn(x)
        n_fwd = len(counter.rows)
        torch.autograd.grad(y, [x] + params, grad_out)
    return counter.rows[:n_fwd], counter.rows[n_fwd:]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("shape", [
    AttnShape(batch=2, height=12, width=12, dim=8, heads=2, window=6, shift=3),
    AttnShape(batch=1, height=12, width=18, dim=12, heads=3, window=6, shift=0),
    AttnShape(batch=3, height=8, width=8, dim=4, heads=1, window=4, shift=2),
    AttnShape(batch=2, height=6, width=6, dim=16, heads=2, window=6, shift=0),  # one window, the last-stage rule
    AttnShape(batch=1, height=3, width=3, dim=16, heads=2, window=3, shift=0),  # one window in all
], ids=["shifted", "unshifted_HneW", "B3_h1", "one_window", "B1_one_window"])
def test_timm_model_matches_dispatched_ops(shape, amp):
    fwd, bwd = _dispatched(shape, amp)
    model = timm_attention_bytes(shape, amp=amp)
    assert [(r, w) for _, r, w in model["forward"]] == [(r, w) for _, r, w in fwd], (model["forward"], fwd)
    assert [(r, w) for _, r, w in model["backward"]] == [(r, w) for _, r, w in bwd], (model["backward"], bwd)


def test_hand_count_one_small_shape():
    # B=1, 4x4 map, C=4, 2 heads, window 2, shift 1, fp32 (no autocast): T = 16 tokens, E = T*C = 64
    # elements, N = 4, S = T*heads*N = 128 scores, 4 windows, table (2*2-1)^2 = 9 rows x 2 heads,
    # the bias heads*N*N = 32 values; all 4 bytes, the index int64.
    s = AttnShape(batch=1, height=4, width=4, dim=4, heads=2, window=2, shift=1)
    E, S, N, TBL, HNN, C = 64, 128, 4, 9 * 2, 32, 4
    copy = 2 * 4 * E                              # read one (B, H, W, C) fp32 tensor, write it
    qkv_linear = (3 * C + E + 3 * C * C) * 4 + 3 * E * 4   # read bias, x, weight; write qkv
    proj_linear = (C + E + C * C) * 4 + E * 4
    gather = (TBL * 4 + N * N * 8 + HNN * 4) + 2 * HNN * 4  # table[index], then permute(...).contiguous
    fwd = (copy * 3                               # roll, pad, partition
           + qkv_linear
           + copy * 3                             # q * scale, q copy, k^T copy
           + 2 * E * 4 + S * 4                    # bmm q k^T
           + gather
           + (S * 4 + HNN * 4) + S * 4            # + bias
           + (S * 4 + 4 * N * N * 4) + S * 4      # + mask (4 windows)
           + 2 * S * 4                            # softmax
           + copy                                 # v copy
           + (S * 4 + E * 4) + E * 4              # bmm attn v
           + copy                                 # heads transpose
           + proj_linear
           + copy * 2)                            # window reverse, roll back
    proj_bwd = (E + C * C) * 4 + E * 4 + 2 * E * 4 + C * C * 4 + E * 4 + C * 4   # mm, mm, sum
    qkv_bwd = (3 * E + 3 * C * C) * 4 + E * 4 + (3 * E + E) * 4 + 3 * C * C * 4 + 3 * E * 4 + 3 * C * 4
    gather_bwd = TBL * 4 + (TBL * 4 + N * N * 8 + HNN * 4) + TBL * 4  # zeros, index_put
    bwd = (copy * 2                               # roll back, window reverse
           + proj_bwd
           + copy                                 # heads transpose
           + (S * 4 + E * 4 + E * 4)              # grad v
           + (2 * E * 4 + S * 4)                  # grad attn
           + 3 * S * 4                            # softmax bwd: reads out and grad, writes grad
           + S * 4 + HNN * 4                      # sum over windows -> grad bias
           + gather_bwd
           + 2 * (E * 4 + S * 4 + E * 4)          # grad k^T, grad q
           + copy                                 # scale
           + 2 * 3 * E * 4 * 2                    # stack q, k, v grads; permute back
           + qkv_bwd
           + copy * 3)                            # partition, pad, roll
    rows = timm_attention_bytes(s, amp=False)
    assert sum(r + w for _, r, w in rows["forward"]) == fwd
    assert sum(r + w for _, r, w in rows["backward"]) == bwd
    assert total(rows) == fwd + bwd

    lse = 16 * 2 * 4                              # one fp32 per query row and head
    op_fwd = (3 * E * 4 + HNN * 4) + (E * 4 + lse)
    op_bwd = (E * 4 + 3 * E * 4 + HNN * 4 + E * 4 + lse) + (3 * E * 4 + HNN * 4)
    fused = fused_attention_bytes(s, amp=False)
    assert sum(r + w for _, r, w in fused["forward"]) == qkv_linear + gather + op_fwd + proj_linear
    assert sum(r + w for _, r, w in fused["backward"]) == proj_bwd + op_bwd + gather_bwd + qkv_bwd
    assert summary(fused)["total"] == total(fused) < total(rows)


def test_block_shapes_follow_timm():
    # Swin-B at 192 px: maps 48, 24, 12, 6; window 6, so the last stage is one unshifted window.
    shapes = swin_block_shapes(192, 4, 128, [2, 2, 18, 2], [4, 8, 16, 32], 6, batch=128)
    assert len(shapes) == 24
    assert [(st, b, s.height, s.dim, s.heads, s.window, s.shift) for st, b, s in shapes[:4]] == [
        (0, 0, 48, 128, 4, 6, 0), (0, 1, 48, 128, 4, 6, 3), (1, 0, 24, 256, 8, 6, 0), (1, 1, 24, 256, 8, 6, 3)]
    assert [(s.height, s.window, s.shift) for _, _, s in shapes[-2:]] == [(6, 6, 0), (6, 6, 0)]
    # Swin-L, window 12: stage 3 (12x12) is one window, stage 4 (6x6) one 6x6 window, neither shifted.
    large = swin_block_shapes(192, 4, 192, [2, 2, 18, 2], [6, 12, 24, 48], 12, batch=128)
    assert {(s.height, s.window, s.shift) for st, _, s in large if st >= 2} == {(12, 12, 0), (6, 6, 0)}
    assert large[1][2].shift == 6
    with pytest.raises(ValueError, match="multiple of window"):
        AttnShape(1, 7, 7, 4, 1, 6, 0)
