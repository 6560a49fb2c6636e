"""End-to-end SimMIM training step (pytest-benchmark): img/s and peak memory per variant.

    pytest benchmarks/bench_step.py                        # CPU: a tiny Swin, batch 4, stock and ours eager
    pytest benchmarks/bench_step.py --benchmark-json out.json   # CUDA: Swin-B and Swin-L, batch 128

The variants of benchmarks/step_speed.py (stock timm eager / compiled, ours, ours with the fused
window attention; the one-process script that benchmarks/gpu_all.sh runs), on synthetic tensors
already on the device, through the engine's plain-PyTorch step (forward, backward, clipping, AdamW).
On CUDA: bf16 autocast, fused AdamW (the project's defaults). On the CPU the compiled variants run
only with SIMMIM_BENCH_COMPILE=1 (minutes of compile there). SIMMIM_BENCH_ENGINES=torch,ds0,ds1 adds
DeepSpeed engines for the stock eager / compiled variants.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import build_step  # noqa: E402
from step_speed import build_variant, fused_attention_available, variant_spec  # noqa: E402

from _device import COMPILE_BACKEND  # noqa: E402

CUDA = torch.cuda.is_available()
MODELS = [("swin_b", 128), ("swin_l", 128)] if CUDA else [("tiny", 4)]
COMPILE = CUDA or os.environ.get("SIMMIM_BENCH_COMPILE") == "1"
VARIANTS = (["stock_eager", "stock_compiled", "ours_fused", "ours"] if COMPILE
            else ["stock_eager", "ours_eager"])
ENGINES = os.environ.get("SIMMIM_BENCH_ENGINES", "torch").split(",")


def _build(model, variant, batch, engine):
    if variant == "ours_eager":  # ours without torch.compile: the CPU's stand-in for "ours"
        return build_step(model, "torch", batch, False, overrides=["engine.cpu_threads=0"])[:3]
    if engine == "torch":
        return build_variant(model, variant, batch, COMPILE_BACKEND)
    spec = variant_spec(variant)
    return build_step(model, engine, batch, spec["compiled"],
                      overrides=["engine.cpu_threads=0"] + spec["overrides"])[:3]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model,batch", MODELS, ids=[m for m, _ in MODELS])
def test_train_step(benchmark, model, batch, variant, engine):
    if engine != "torch":
        pytest.importorskip("deepspeed")
        if not variant.startswith("stock"):
            pytest.skip("DeepSpeed engines run the stock variants")
    if variant == "ours_fused" and fused_attention_available():
        pytest.skip(fused_attention_available())
    if CUDA:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    step, sync, backend = _build(model, variant, batch, engine)
    for _ in range(5 if CUDA else 2):  # warm-up, compile
        step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()

    def one():
        step()
        sync()
    benchmark.pedantic(one, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        img_per_s=round(batch / mean, 1), batch=batch, model=model, variant=variant, compiled=backend.compiled,
        engine=engine, precision=backend.precision, device=torch.cuda.get_device_name() if CUDA else "cpu",
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if CUDA else None)
    peak = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if CUDA else ""
    print(f"\n{model} batch {batch} {engine} {variant}: {batch / mean:.1f} img/s{peak}")
