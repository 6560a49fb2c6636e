"""benchmarks/bench_attention.py calls window_attention the way its documented API expects.

The fused op may not be in this build; a plain-PyTorch stand-in of the documented formula
(qkv (B, H, W, 3C) before shift/partition, bias (1 or none, heads, N, N), the cyclic shift and the
-100 region mask done inside, output (B, H, W, C) before proj) takes its place, and the
benchmark's "fused" path must then equal timm's SwinTransformerBlock._attn, forward and backward.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402
import simmim_kernels  # noqa: E402
from attention_bytes import AttnShape  # noqa: E402


def _regions(size, window, shift):
    c = torch.arange(size)
    return (c >= size - window).long() + (c >= size - shift).long()


def window_attention_standin(qkv, bias, num_heads, window_size, shift_size, scale=None, backend="auto"):
    B, H, W, C3 = qkv.shape
    C, ws, s = C3 // 3, window_size, shift_size
    d, N = C // num_heads, window_size ** 2
    scale = d ** -0.5 if scale is None else scale
    if s:
        qkv = torch.roll(qkv, (-s, -s), (1, 2))
    win = qkv.view(B, H // ws, ws, W // ws, ws, C3).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, 3, num_heads, d)
    q, k, v = win.permute(2, 0, 3, 1, 4).unbind(0)                        # (B*nW, heads, N, d)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.reshape(1, num_heads, N, N)
    if s:
        region = _regions(H, ws, s)[:, None] * 3 + _regions(W, ws, s)[None, :]          # (H, W)
        rw = region.view(H // ws, ws, W // ws, ws).permute(0, 2, 1, 3).reshape(-1, N)  # (nW, N)
        mask = (rw[:, :, None] != rw[:, None, :]).to(attn.dtype) * -100.0
        nw = mask.shape[0]
        attn = (attn.view(B, nw, num_heads, N, N) + mask[None, :, None]).view(-1, num_heads, N, N)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws, ws, C)
    out = out.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    return torch.roll(out, (s, s), (1, 2)) if s else out


@pytest.mark.parametrize("shape", [AttnShape(2, 12, 12, 16, 2, 6, 3), AttnShape(1, 8, 12, 12, 3, 4, 0),
                                   AttnShape(3, 6, 6, 8, 2, 6, 0)], ids=["shifted", "HneW", "one_window"])
def test_fused_path_matches_timm(monkeypatch, shape):
    monkeypatch.setattr(simmim_kernels, "window_attention", window_attention_standin, raising=False)
    monkeypatch.setattr(bench_attention, "DEVICE", "cpu")
    block = bench_attention._block(shape)
    x = torch.randn(shape.batch, shape.height, shape.width, shape.dim, requires_grad=True)
    grad_out = torch.randn(x.shape)
    params = [x] + list(block.attn.parameters())
    want = torch.autograd.grad(block._attn(x), params, grad_out)
    got = torch.autograd.grad(bench_attention.attention_fn(block, "fused")(x), params, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cases_per_stage():
    b = bench_attention.model_cases("swin_b")
    assert list(b) == ["swin_b stage1 48x48x128 h4 w6 shift3", "swin_b stage2 24x24x256 h8 w6 shift3",
                       "swin_b stage3 12x12x512 h16 w6 shift3", "swin_b stage4 6x6x1024 h32 w6 shift0"]
    large = bench_attention.model_cases("swin_l", every_block_kind=True)
    assert [(s.height, s.window, s.shift) for s in large.values()] == [
        (48, 12, 6), (48, 12, 0), (24, 12, 6), (24, 12, 0), (12, 12, 0), (6, 6, 0)]
    assert all(s.batch == 128 for s in large.values())
