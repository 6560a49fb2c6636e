"""End-to-end SimMIM training step (pytest-benchmark): img/s and peak memory, eager vs compiled.

    pytest benchmarks/bench_step.py                        # CPU: a tiny Swin, batch 8, eager
    pytest benchmarks/bench_step.py --benchmark-json out.json   # CUDA: Swin-B and Swin-L, batch 128

Synthetic tensors already on the device, so it measures the model and the engine's step (forward,
backward, clipping, AdamW), not the loader. The engine is the plain-PyTorch yardstick by default;
SIMMIM_BENCH_ENGINES=torch,ds0,ds1 adds DeepSpeed variants (each builds its engine in this process).
On CUDA: bf16 autocast, fused AdamW (the project's defaults). SIMMIM_BENCH_COMPILE=1 adds compiled
runs on the CPU (minutes of compile there).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import build_step  # noqa: E402

CUDA = torch.cuda.is_available()
MODELS = [("swin_b", 128), ("swin_l", 128)] if CUDA else [("tiny", 8)]
COMPILE = [False, True] if CUDA or os.environ.get("SIMMIM_BENCH_COMPILE") == "1" else [False]
ENGINES = os.environ.get("SIMMIM_BENCH_ENGINES", "torch").split(",")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("compiled", COMPILE, ids=lambda c: "compiled" if c else "eager")
@pytest.mark.parametrize("model,batch", MODELS, ids=[m for m, _ in MODELS])
def test_train_step(benchmark, model, batch, compiled, engine):
    if engine != "torch":
        pytest.importorskip("deepspeed")
    if CUDA:
        torch.cuda.empty_cache()
    step, sync, backend, _ = build_step(model, engine, batch, compiled,
                                        overrides=["engine.cpu_threads=0"])
    for _ in range(5 if CUDA else 2):  # warm-up, compile
        step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()

    def one():
        step()
        sync()
    benchmark.pedantic(one, rounds=20 if CUDA else 5, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        img_per_s=round(batch / mean, 1), batch=batch, model=model, compiled=backend.compiled, engine=engine,
        precision=backend.precision, device=torch.cuda.get_device_name() if CUDA else "cpu",
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if CUDA else None)
    peak = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if CUDA else ""
    print(f"\n{model} batch {batch} {engine} {'compiled' if compiled else 'eager'}: {batch / mean:.1f} img/s{peak}")
