"""The window-attention reference and the fused op against timm's SwinTransformerBlock.

timm's block path is roll -> pad -> partition -> WindowAttention -> reverse -> roll back; with the
output projection replaced by an identity, it must equal the op applied to the block's qkv Linear
on the normed map, forward and backward (d(qkv), and d(bias) through timm's gathered bias).
"""
import sys

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformerBlock

from simmim_fast.kernels import _utils, reference as ref, window_attention

wa_module = sys.modules["simmim_fast.kernels.window_attention"]  # the op's module (the op has its name)

INTERPRETED = (_utils.TRITON_IMPORT_ERROR is None
               and _utils.triton_interpreted(wa_module._window_attention_fwd_kernel))
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def _block(dim, res, heads, ws, shift, seed):
    torch.manual_seed(seed)
    # always_partition keeps the requested window and shift even where the map is not larger
    blk = SwinTransformerBlock(dim, res, num_heads=heads, window_size=ws, shift_size=shift, always_partition=True)
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # larger than the init, so the bias matters
    blk.attn.proj = nn.Identity()
    return blk.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("b,h,w,ws,shift,heads,dim", [
    (1, 12, 12, 6, 3, 1, 16),
    (2, 6, 12, 6, 3, 3, 48),     # head dim 16, H != W, 3 heads
    (1, 6, 6, 6, 0, 2, 64),      # one window, head dim 32
    (1, 12, 12, 12, 6, 1, 32),   # window 12, shifted single window
])
def test_op_matches_timm_block(backend, b, h, w, ws, shift, heads, dim):
    if backend == "triton" and not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip("the Triton kernels cannot run here")
    blk = _block(dim, (h, w), heads, ws, shift, seed=b + h + w)
    g = torch.Generator().manual_seed(ws + shift)
    x = torch.randn(b, h, w, dim, generator=g).to(DEVICE)
    grad = torch.randn(b, h, w, dim, generator=g).to(DEVICE)
    xn = blk.norm1(x).detach()

    table = blk.attn.relative_position_bias_table
    xn_timm = xn.clone().requires_grad_()
    expected = blk._attn(xn_timm)
    dx_timm, dt_timm = torch.autograd.grad(expected, (xn_timm, table), grad)

    xn_op = xn.clone().requires_grad_()
    out = window_attention(blk.attn.qkv(xn_op), blk.attn._get_rel_pos_bias(), heads, ws, shift, backend=backend)
    # d(qkv) reaches the normed map through the same qkv Linear as in timm's path
    dx_op, dt_op = torch.autograd.grad(out, (xn_op, table), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_op, dx_timm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dt_op, dt_timm, rtol=1e-4, atol=1e-5)


def test_reference_mask_equals_timm_mask():
    blk = SwinTransformerBlock(16, (12, 18), num_heads=1, window_size=6, shift_size=3)
    torch.testing.assert_close(ref.shift_window_mask(12, 18, 6, 3), blk.attn_mask.float(), rtol=0, atol=0)
