#!/usr/bin/env python
"""The whole SimMIM training step, stock timm vs ours, all variants in ONE process: img/s, peak memory.

    python benchmarks/step_speed.py --models swin_b swin_l --batch 128 --budget-s 300 --json steps.json
    python benchmarks/step_speed.py --models tiny_cpu --batch 2 --warmup 1 --steps 2      # CPU: logic only

The step is the engine's own plain-PyTorch step (engine.mode=torch, simmim_fast.engine.backends:
forward under bf16 autocast on CUDA with fp32 weights, backward, gradient clipping, fused AdamW) on
synthetic tensors already on the device (data.backend=synthetic), so it measures the model and the
step, not the loader. Variants, in this order per model (the fused attention before ours default,
as it is the figure the target is about; when the time budget runs short, the last ones are skipped):

  stock_eager     timm's Swin and plain-PyTorch mask substitution + L1 loss (model.ops_backend=torch,
                  model.attention=timm where the schema has it), eager
  stock_compiled  the same under torch.compile: the yardstick every ratio is taken against
  ours_fused      ours (below) with model.attention=fused: every Swin block's attention through
                  simmim_kernels.window_attention; "not available in this build" where the op or the
                  config key is missing
  ours            this repository's defaults (fused Triton ops where they apply), compiled (engine.compile
                  'auto' is on with CUDA)

Each variant runs its warm-up steps (compilation included, timed as warmup_s), then ``--steps`` timed
steps in windows of 5; img/s is batch / the median window's time per step. Peak memory is the
maximum allocated during the timed steps. A budget (--budget-s) bounds the whole run: a variant that
would not fit by its estimated need (compiled: the longest warm-up seen so far x 1.25, else
--compile-estimate-s) is skipped and says so, instead of being killed half-way. The JSON is
rewritten after every variant, so a run stopped from outside keeps what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import simmim_kernels  # noqa: E402
from engine_speed import MODELS, build_step  # noqa: E402
from simmim_fast.config import ModelConfig  # noqa: E402

VARIANTS = ["stock_eager", "stock_compiled", "ours_fused", "ours"]
NOT_AVAILABLE = "not available in this build"
YARDSTICK = "stock_compiled"


def _has_attention_key() -> bool:
    return any(f.name == "attention" for f in dataclasses.fields(ModelConfig))


def fused_attention_available() -> Optional[str]:
    """None when ours_fused can run, else why not."""
    missing = []
    if not hasattr(simmim_kernels, "window_attention"):
        missing.append("simmim_kernels.window_attention")
    if not _has_attention_key():
        missing.append("config key model.attention")
    return f"{NOT_AVAILABLE} (missing: {', '.join(missing)})" if missing else None


def variant_spec(variant: str) -> Dict:
    """compiled flag and config overrides of one variant."""
    attention = ["model.attention=timm"] if _has_attention_key() else []
    if variant == "stock_eager":
        return dict(compiled=False, overrides=["model.ops_backend=torch"] + attention)
    if variant == "stock_compiled":
        return dict(compiled=True, overrides=["model.ops_backend=torch"] + attention)
    if variant == "ours":
        return dict(compiled=True, overrides=[])
    if variant == "ours_fused":
        return dict(compiled=True, overrides=["model.attention=fused"])
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def build_variant(model: str, variant: str, batch: int, compile_backend: str = "inductor",
                  extra_overrides=()):
    """(step, sync, backend) for one variant. With inductor the engine compiles the model itself
    (exactly what train.py runs); another backend (a CPU smoke run) wraps the engine's module here."""
    spec = variant_spec(variant)
    engine_compiles = spec["compiled"] and compile_backend == "inductor"
    step, sync, backend, _ = build_step(model, "torch", batch, engine_compiles,
                                        overrides=["engine.cpu_threads=0"] + spec["overrides"] + list(extra_overrides))
    if spec["compiled"] and not engine_compiles:
        backend.net = torch.compile(backend.net, backend=compile_backend)
        backend.compiled = True
    return step, sync, backend


def _free() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model: str, variant: str, batch: int, warmup: int, steps: int, compile_backend: str,
            extra_overrides=()) -> Dict:
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    step, sync, backend = build_variant(model, variant, batch, compile_backend, extra_overrides)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        r = step()
    sync()
    warmup_s = time.perf_counter() - t0
    loss = float(r.loss)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    window = min(5, max(1, steps))
    times = []
    for _ in range(max(1, steps // window)):
        sync()
        t = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        times.append((time.perf_counter() - t) / window)
    step_s = statistics.median(times)
    row = dict(status="ok", compiled=backend.compiled, compile_backend=compile_backend if backend.compiled else None,
               precision=backend.precision, img_per_s=round(batch / step_s, 1), step_ms=round(step_s * 1e3, 2),
               step_ms_min=round(min(times) * 1e3, 2), timed_steps=window * len(times),
               warmup_steps=max(1, warmup), warmup_s=round(warmup_s, 1), build_s=round(build_s, 1),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
               loss_after_warmup=loss)
    del step, backend
    return row


def add_ratios(rows: List[Dict]) -> None:
    """ratio_to_stock_compiled for every measured row whose model has a measured yardstick."""
    base = {r["model"]: r["img_per_s"] for r in rows if r["variant"] == YARDSTICK and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok" and r["model"] in base:
            r["ratio_to_stock_compiled"] = round(r["img_per_s"] / base[r["model"]], 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["swin_b", "swin_l"], choices=sorted(MODELS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (the first one compiles)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (windows of 5)")
    limit = os.environ.get("SIMMIM_PART_LIMIT_S")  # benchmarks/gpu_all.sh's limit for this part
    ap.add_argument("--budget-s", type=float, default=float(limit) - 15 if limit else float("inf"),
                    help="the whole run's time budget (default: $SIMMIM_PART_LIMIT_S - 15 s, else none)")
    ap.add_argument("--eager-estimate-s", type=float, default=30.0, help="what an eager variant needs")
    ap.add_argument("--compile-estimate-s", type=float, default=150.0,
                    help="what a compiled variant needs before one has been timed here")
    ap.add_argument("--compile-backend", default=os.environ.get("SIMMIM_BENCH_COMPILE_BACKEND", "inductor"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override (all variants)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                batch=args.batch, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                engine="engine.mode=torch (plain PyTorch step), synthetic data",
                precision="bf16 autocast, fp32 weights" if cuda else "fp32", compile_backend=args.compile_backend)
    rows = [dict(model=m, variant=v, batch=args.batch, status="pending") for m in args.models for v in args.variants]
    unavailable = fused_attention_available()

    def save():
        add_ratios(rows)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
            tmp.replace(args.json)

    save()
    longest_compile = None
    failed = 0
    for row in rows:
        model, variant = row["model"], row["variant"]
        if variant == "ours_fused" and unavailable:
            row["status"] = unavailable
            save()
            print(f"{model:8s} {variant:15s} {unavailable}", flush=True)
            continue
        compiled = variant_spec(variant)["compiled"]
        need = ((longest_compile * 1.25 + 10) if longest_compile else args.compile_estimate_s) if compiled \
            else args.eager_estimate_s
        left = args.budget_s - (time.perf_counter() - start)
        if left < need:
            row["status"] = f"skipped: time budget ({left:.0f} s left, needs ~{need:.0f} s)"
            save()
            print(f"{model:8s} {variant:15s} {row['status']}", flush=True)
            continue
        print(f"{model:8s} {variant:15s} running ({left:.0f} s left) ...", flush=True)
        try:
            row.update(measure(model, variant, args.batch, args.warmup, args.steps, args.compile_backend,
                               args.overrides))
            if compiled:
                longest_compile = max(longest_compile or 0.0, row["warmup_s"] + row["build_s"])
        except Exception as e:  # noqa: BLE001 - record it and measure the other variants
            failed += 1
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        _free()
        save()
        if row["status"] == "ok":
            peak = f"  peak {row['peak_mem_gib']} GiB" if row["peak_mem_gib"] is not None else ""
            print(f"{model:8s} {variant:15s} {row['img_per_s']:9.1f} img/s  {row['step_ms']:8.2f} ms/step  "
                  f"warm-up {row['warmup_s']} s{peak}", flush=True)
        else:
            print(f"{model:8s} {variant:15s} {row['status']}", flush=True)
    save()
    for r in rows:
        if "ratio_to_stock_compiled" in r:
            print(f"{r['model']:8s} {r['variant']:15s} x{r['ratio_to_stock_compiled']:.3f} of stock compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
