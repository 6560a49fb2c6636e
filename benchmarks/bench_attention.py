"""Swin window attention: the fused ``window_attention`` op vs timm's path, forward + backward.

    pytest benchmarks/bench_attention.py     # CPU: tiny shapes (the op in Triton's interpreter), proves the suite runs
    bash benchmarks/gpu_all.sh OUT           # GPU: Swin-B / Swin-L shapes per stage, bs 128, bf16 autocast

What is timed is one block's attention section, from the normed map x (B, H, W, C) to the output
projection in the image layout, as timm's ``SwinTransformerBlock._attn`` computes it, and its
backward (torch.autograd.grad to x and every attention parameter: qkv, proj, the bias table):

- ``timm_eager`` / ``timm_compiled``: a stock timm ``SwinTransformerBlock._attn`` (roll, partition,
  WindowAttention, reverse, roll back), eager and under torch.compile.
- ``fused`` / ``fused_compiled``: the same block's qkv Linear on the un-partitioned map, then
  ``simmim_kernels.window_attention`` (shift, partition, bias, shift mask, softmax, reverse by index
  arithmetic), then its proj Linear; eager and under torch.compile. Reported as "not available in
  this build" where simmim_kernels has no ``window_attention``.

GPU: per stage of Swin-B (window 6) and Swin-L (window 12) at 192 px, batch 128, bf16 autocast with
fp32 weights as in training; each stage's shifted block where it has one (the costlier of its two
block kinds), else its unshifted one; SIMMIM_BENCH_ATTN_CASES=all adds the unshifted blocks of the
shifted stages. Each row also carries the HBM bytes its variant moves by the bytes model of
benchmarks/attention_bytes.py (none for the compiled timm path: inductor fuses the ops the model counts).
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from _device import COMPILE_BACKEND, DEVICE, ON_GPU, sync_timer
from attention_bytes import AttnShape, fused_attention_bytes, summary, swin_block_shapes, timm_attention_bytes

import simmim_kernels

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from simmim_fast import load_config  # noqa: E402

HAVE_FUSED = hasattr(simmim_kernels, "window_attention")
NOT_AVAILABLE = "not available in this build"
AMP = ON_GPU  # bf16 autocast on the GPU, as in training; fp32 in the CPU interpreter
VARIANTS = ["fused", "timm_eager", "timm_compiled", "fused_compiled"]
ROUNDS = dict(rounds=10, iterations=3, warmup_rounds=2) if ON_GPU else dict(rounds=1, iterations=1, warmup_rounds=0)


def model_cases(model: str, batch: int = 128, every_block_kind: bool = False):
    """name -> AttnShape for each stage of configs/<model>.json (see the module doc for which blocks)."""
    m = load_config(ROOT / "configs" / f"{model}.json").model
    shapes = swin_block_shapes(m.img_size, m.patch_size, m.embed_dim, m.depths, m.num_heads, m.window_size, batch)
    cases = {}
    for stage in sorted({st for st, _, _ in shapes}):
        kinds = {s.shift: s for st, _, s in shapes if st == stage}
        chosen = sorted(kinds.values(), key=lambda s: -s.shift)
        for s in chosen if every_block_kind else chosen[:1]:
            name = f"{model} stage{stage + 1} {s.height}x{s.width}x{s.dim} h{s.heads} w{s.window} shift{s.shift}"
            cases[name] = s
    return cases


def _cases():
    if ON_GPU:
        every = os.environ.get("SIMMIM_BENCH_ATTN_CASES") == "all"
        return {**model_cases("swin_b", every_block_kind=every), **model_cases("swin_l", every_block_kind=every)}
    return {"tiny 12x12x32 h2 w6 shift3": AttnShape(2, 12, 12, 32, 2, 6, 3),
            "tiny 6x6x32 h2 w6 one window": AttnShape(2, 6, 6, 32, 2, 6, 0)}


CASES = _cases()


def _block(s: AttnShape) -> SwinTransformerBlock:
    torch.manual_seed(0)
    block = SwinTransformerBlock(s.dim, (s.height, s.width), s.heads, window_size=s.window, shift_size=s.shift,
                                 always_partition=False).to(DEVICE)
    assert block.window_size == (s.window, s.window) and block.shift_size == (s.shift, s.shift)
    with torch.no_grad():  # timm inits the table with std 0.02: make the bias matter in the comparison
        block.attn.relative_position_bias_table.normal_(0, 1)
    return block


def attention_fn(block: SwinTransformerBlock, variant: str):
    """x (B, H, W, C) -> (B, H, W, C) for one variant of the attention section."""
    if variant.startswith("timm"):
        fn = block._attn
    else:
        attn, window, shift = block.attn, block.window_size[0], block.shift_size[0]
        window_attention = simmim_kernels.window_attention

        def fn(x):
            qkv = attn.qkv(x)                                 # (B, H, W, 3C): a per-token Linear
            out = window_attention(qkv, attn._get_rel_pos_bias(), attn.num_heads, window, shift, scale=attn.scale,
                                   backend="triton")
            return attn.proj(out)
    if variant.endswith("compiled"):
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=COMPILE_BACKEND)
    return fn


def bytes_of(variant: str, s: AttnShape):
    """The bytes model for ``variant`` (None for the compiled timm path: not modelled)."""
    if variant == "timm_eager":
        return summary(timm_attention_bytes(s, amp=AMP))
    if variant.startswith("fused"):
        return summary(fused_attention_bytes(s, amp=AMP))
    return None


@pytest.mark.benchmark(timer=sync_timer)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_window_attention(benchmark, results, case, variant):
    s = CASES[case]
    counted = bytes_of(variant, s)
    row = dict(suite="attention", order=VARIANTS.index(variant), min_bytes=counted and counted["total"],
               bytes_model=counted, shape=s.__dict__)
    if variant.startswith("fused") and not HAVE_FUSED:
        results[(case, variant)] = dict(row, status=NOT_AVAILABLE)
        pytest.skip(f"simmim_kernels.window_attention: {NOT_AVAILABLE}")
    block = _block(s)
    params = list(block.attn.parameters())
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(s.batch, s.height, s.width, s.dim, device=DEVICE, generator=g).requires_grad_()
    out_dtype = torch.bfloat16 if AMP else torch.float32
    grad_out = torch.randn(x.shape, device=DEVICE, generator=g).to(out_dtype)
    fn = attention_fn(block, variant)

    def step():
        with torch.autocast(DEVICE, torch.bfloat16, enabled=AMP):
            y = fn(x)
        return torch.autograd.grad(y, [x] + params, grad_out)

    got = step()
    if variant != "timm_eager":  # a fast wrong answer is no result
        want = torch.autograd.grad(_attn_autocast(block, x), [x] + params, grad_out)
        tol = 5e-2 if AMP else 1e-4
        for name, a, b in zip(["x"] + [n for n, _ in block.attn.named_parameters()], got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item(),
                                       msg=lambda m, name=name: f"grad {name}: {m}")
    benchmark.group = case
    benchmark.extra_info.update(bytes_model=counted, variant=variant, amp=AMP)
    benchmark.pedantic(step, **ROUNDS)
    t = benchmark.stats.stats.median
    if counted:
        benchmark.extra_info["GB/s"] = counted["total"] / t / 1e9
    results[(case, variant)] = dict(row, time_s=t)


def _attn_autocast(block, x):
    with torch.autocast(DEVICE, torch.bfloat16, enabled=AMP):
        return block._attn(x)
