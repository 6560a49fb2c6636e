#!/usr/bin/env python
"""Large-model pretraining: the memory planner's choice beside the measured step, per model.

    python benchmarks/bench_scale.py --models swinv2_h swinv2_g swin_l --json scale.json     # CUDA
    python benchmarks/bench_scale.py --models swinv2_tiny_cpu swin_tiny_cpu --steps 2        # CPU: logic only
    pytest benchmarks/bench_scale.py          # CPU: the tiny configs, 2 steps; CUDA: SwinV2-H

For each model (configs/swin_l.json, swinv2_h.json, swinv2_g.json; on the CPU the tiny configs)
``simmim_fast.tools.plan.plan`` (what ``simmim-fast plan`` prints) plans the config for ONE GPU of
this device's memory (``--gpu-memory-gb``; on the CPU 80 GB, a stand-in: nothing is checked
against it). Then a few SimMIM pretraining steps run per choice, in this order: the planner's
recommended choice, the same ZeRO stage and offload with activation checkpointing switched
(on where it was off, off where it was on), then the fastest fitting ZeRO-0 choice of each
checkpointing setting where those are not already there; each at the micro batch the planner
chose for it. Choices that do not fit are not run.

The step is the engine's own (benchmarks/engine_speed.py ``build_step``: synthetic tensors on the
device, forward, backward, clipping, AdamW), at the choice's micro batch with no gradient
accumulation (accumulation changes the number of micro steps, not the memory: gradients
accumulate in place). ZeRO-0 without offload runs on the plain-PyTorch engine (engine.mode=torch,
bf16 autocast with fp32 weights on CUDA); ZeRO 1-3 and offload need DeepSpeed (engine.mode=
deepspeed): where it is not installed those choices are skipped with that reason. Eager by default
(``--compile`` for engine.compile=true): the planner measures the eager model, and inductor would
add minutes of compilation per choice at these sizes.

Per choice, on CUDA: img/s (micro batch / the median timed step), the peak allocated memory over
the whole choice (build, warm-up and timed steps: ``torch.cuda.max_memory_allocated`` above what
was allocated before it) beside the planner's allocated bytes (its per-GPU figure less its
fragmentation and reserved allowances), their ratio measured / predicted, and the same for the
allocator's reserved memory against the planner's per-GPU figure less the reserved allowance.
On the CPU only the CPU time per step and the planner's prediction are recorded. GB = 2^30 bytes.

A budget (--budget-s, default $SIMMIM_PART_LIMIT_S - 15 s from benchmarks/gpu_all.sh) bounds the
run: a model is not planned, and a choice not run, when what is left is below its estimate (the
longest choice of the same model so far x 1.25, else --choice-estimate-s); it is reported as
"skipped: time budget". The JSON is rewritten after every choice.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
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

from engine_speed import MODELS, build_step  # noqa: E402
from perf_report import scale_table  # noqa: E402
from simmim_fast import load_config  # noqa: E402
from simmim_fast.tools.plan import Choice, Plan, plan  # noqa: E402

GPU_MODELS = ["swinv2_h", "swinv2_g", "swin_l"]
CPU_MODELS = ["swinv2_tiny_cpu", "tiny_cpu"]   # configs/swinv2_tiny_cpu.json, configs/swin_tiny_cpu.json
CPU_GPU_MEMORY_GB = 80.0                        # the CPU run's stand-in for the GPU it plans for


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def describe(c: Choice) -> str:
    return (f"ZeRO-{c.zero_stage}, offload {c.offload}, checkpointing "
            f"{'every block' if c.activation_checkpointing else 'off'}, micro batch {c.micro_batch}")


def choices_to_run(p: Plan) -> List[Choice]:
    """The recommended choice, the same with checkpointing switched, then the fastest fitting ZeRO-0
    choice (no offload) of each checkpointing setting; fitting ones only, each once."""
    rec = p.recommended
    if rec is None:
        return []
    out = [rec]

    def add(pred):
        for c in p.choices:  # the planner lists them fastest first
            if c.fits and pred(c):
                if all(c is not o for o in out):
                    out.append(c)
                return

    add(lambda c: (c.zero_stage, c.offload) == (rec.zero_stage, rec.offload)
        and c.activation_checkpointing != rec.activation_checkpointing)
    for ckpt in (False, True):
        add(lambda c, ckpt=ckpt: c.zero_stage == 0 and c.offload == "none" and c.activation_checkpointing == ckpt)
    return out


def needs_deepspeed(c: Choice) -> bool:
    return c.zero_stage > 0 or c.offload != "none"


def skip_reason(c: Choice, have_deepspeed: bool) -> Optional[str]:
    """Why this choice cannot run here, or None."""
    if needs_deepspeed(c) and not have_deepspeed:
        return (f"skipped: ZeRO-{c.zero_stage}" + (f" with offload {c.offload}" if c.offload != "none" else "")
                + " needs DeepSpeed (engine.mode=deepspeed), not installed here; only engine.mode=torch "
                "(ZeRO-0) choices run")
    return None


def prediction(c: Choice) -> Dict:
    """The planner's figures for one choice (GB = 2^30 bytes)."""
    b = c.gpu_breakdown_gb
    return dict(predicted_per_gpu_gb=c.per_gpu_gb,
                predicted_allocated_gb=round(c.per_gpu_gb - b["fragmentation"] - b["reserved"], 3),
                predicted_allocator_gb=round(c.per_gpu_gb - b["reserved"], 3),
                predicted_per_host_gb=c.per_host_gb)


def _free() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model: str, c: Choice, cfg, warmup: int, steps: int, compile: bool) -> Dict:
    """A few pretraining steps of one choice: time per step and (CUDA) peak memory."""
    cuda = torch.cuda.is_available()
    _free()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    base_reserved = torch.cuda.memory_reserved() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ds = needs_deepspeed(c)
    overrides = ["engine.cpu_threads=0", f"engine.activation_checkpointing={json.dumps(c.activation_checkpointing)}"]
    if ds:
        overrides.append(f"engine.offload={c.offload}")
    t0 = time.perf_counter()
    step, sync, backend, _ = build_step(model, f"ds{c.zero_stage}" if ds else "torch", c.micro_batch, compile,
                                        bf16_weights=bool(cfg.engine.bf16_weights) if ds else False,
                                        precision=cfg.engine.precision, optimizer=cfg.engine.optimizer,
                                        overrides=overrides)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        r = step()
    sync()
    warmup_s = time.perf_counter() - t0
    loss = float(r.loss)
    times = []
    for _ in range(max(1, steps)):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    row = dict(status="ok", engine="deepspeed" if ds else "torch", precision=backend.precision,
               compiled=backend.compiled, build_s=round(build_s, 1), warmup_steps=max(1, warmup),
               warmup_s=round(warmup_s, 1), timed_steps=len(times), loss_after_warmup=loss)
    if cuda:
        row.update(img_per_s=round(c.micro_batch / step_s, 1), step_ms=round(step_s * 1e3, 1),
                   peak_alloc_gib=round((torch.cuda.max_memory_allocated() - base_alloc) / 2 ** 30, 2),
                   peak_reserved_gib=round((torch.cuda.max_memory_reserved() - base_reserved) / 2 ** 30, 2))
    else:
        row.update(cpu_step_ms=round(step_s * 1e3, 1))
    del step, backend, r
    return row


def add_ratios(row: Dict) -> None:
    """measured / predicted, where both are there."""
    if row.get("peak_alloc_gib") and row.get("predicted_allocated_gb"):
        row["ratio_alloc"] = round(row["peak_alloc_gib"] / row["predicted_allocated_gb"], 3)
    if row.get("peak_reserved_gib") and row.get("predicted_allocator_gb"):
        row["ratio_reserved"] = round(row["peak_reserved_gib"] / row["predicted_allocator_gb"], 3)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=GPU_MODELS if cuda else CPU_MODELS, choices=sorted(MODELS))
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="the GPU the planner plans for (default: this GPU's memory; on the CPU "
                         f"{CPU_GPU_MEMORY_GB:g})")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first allocates the optimiser "
                                                          "states)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per choice")
    ap.add_argument("--compile", action="store_true", help="engine.compile=true (default: eager)")
    limit = os.environ.get("SIMMIM_PART_LIMIT_S")  # benchmarks/gpu_all.sh's limit for this part
    ap.add_argument("--budget-s", type=float, default=float(limit) - 15 if limit else float("inf"),
                    help="the whole run's time budget (default: $SIMMIM_PART_LIMIT_S - 15 s, else none)")
    ap.add_argument("--plan-estimate-s", type=float, default=30.0, help="what planning one model needs")
    ap.add_argument("--choice-estimate-s", type=float, default=90.0,
                    help="what the first choice of a model needs (build, warm-up, timed steps)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    gpu_gb = args.gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda
                                    else CPU_GPU_MEMORY_GB)
    have_ds = deepspeed_available()
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpus=1, gpu_memory_gb=round(gpu_gb, 1),
                gpu_memory_from=("--gpu-memory-gb" if args.gpu_memory_gb else "this GPU" if cuda
                                 else "a stand-in on the CPU"),
                deepspeed=have_ds, compiled=args.compile, warmup=args.warmup, steps=args.steps,
                engine="build_step of benchmarks/engine_speed.py, synthetic data, no gradient accumulation")
    rows: List[Dict] = []

    def save():
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
            tmp.replace(args.json)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    save()
    failed = 0
    for model in args.models:
        if left() < args.plan_estimate_s:
            rows.append(dict(model=model, status=f"skipped: time budget ({left():.0f} s left, planning needs "
                                                 f"~{args.plan_estimate_s:.0f} s)"))
            print(f"{model:16s} {rows[-1]['status']}", flush=True)
            save()
            continue
        cfg = load_config(MODELS[model][0], overrides=MODELS[model][1])
        t0 = time.perf_counter()
        p = plan(cfg, gpus=1, gpu_memory_gb=gpu_gb)
        plan_s = round(time.perf_counter() - t0, 1)
        head = dict(model=model, config=str(Path(MODELS[model][0]).relative_to(ROOT)),
                    params_m=round(p.model_params / 1e6, 1), plan_s=plan_s)
        runs = choices_to_run(p)
        if not runs:
            rows.append(dict(head, status=f"not run: {p.problem}"))
            print(f"{model:16s} {rows[-1]['status']}", flush=True)
            save()
            continue
        longest = None
        for c in runs:
            row = dict(head, zero_stage=c.zero_stage, offload=c.offload,
                       activation_checkpointing=c.activation_checkpointing, micro_batch=c.micro_batch,
                       recommended=c is p.recommended, **prediction(c))
            rows.append(row)
            reason = skip_reason(c, have_ds)
            need = longest * 1.25 if longest else args.choice_estimate_s
            if reason is None and left() < need:
                reason = f"skipped: time budget ({left():.0f} s left, needs ~{need:.0f} s)"
            if reason:
                row["status"] = reason
                print(f"{model:16s} {describe(c)}: {reason}", flush=True)
                save()
                continue
            print(f"{model:16s} {describe(c)}: predicted {row['predicted_allocated_gb']} GB allocated "
                  f"({row['predicted_per_gpu_gb']} GB per GPU); running ({left():.0f} s left) ...", flush=True)
            t0 = time.perf_counter()
            try:
                row.update(measure(model, c, cfg, args.warmup, args.steps, args.compile))
            except Exception as e:  # noqa: BLE001 - record it (an OOM too) and go on with the others
                failed += 1
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if cuda:
                    row["peak_alloc_gib_at_failure"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                traceback.print_exc()
            longest = max(longest or 0.0, time.perf_counter() - t0)
            _free()
            add_ratios(row)
            save()
            if row["status"] != "ok":
                print(f"{model:16s} {row['status']}", flush=True)
            elif cuda:
                print(f"{model:16s} {row['img_per_s']} img/s, peak {row['peak_alloc_gib']} GiB allocated "
                      f"(x{row.get('ratio_alloc', '-')} of predicted), {row['peak_reserved_gib']} GiB reserved "
                      f"(x{row.get('ratio_reserved', '-')})", flush=True)
            else:
                print(f"{model:16s} {row['cpu_step_ms']} ms per step on the CPU", flush=True)
    save()
    print("\n".join(scale_table({"meta": meta, "results": rows})))
    if have_ds:
        from simmim_fast.engine.dist import shutdown
        shutdown()
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# pytest: `pytest benchmarks/bench_scale.py` (CPU: the tiny configs, 2 steps, CPU time and the plan)

def test_scale(tmp_path):
    out = tmp_path / "scale.json"
    models = ["swinv2_h"] if torch.cuda.is_available() else CPU_MODELS
    rc = main(["--models", *models, "--steps", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report
    rows = report["results"]
    assert [r["model"] for r in rows if r.get("recommended")] == models   # one recommended choice per model
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        assert mine[0]["recommended"] and mine[0]["status"] == "ok", mine
        # the second: the recommended choice with checkpointing switched
        assert (mine[1]["zero_stage"], mine[1]["offload"]) == (mine[0]["zero_stage"], mine[0]["offload"])
        assert mine[1]["activation_checkpointing"] != mine[0]["activation_checkpointing"]
        for r in mine:
            assert 0 < r["predicted_allocated_gb"] <= r["predicted_allocator_gb"] < r["predicted_per_gpu_gb"]
            if r["status"] == "ok" and not torch.cuda.is_available():
                assert r["cpu_step_ms"] > 0 and "img_per_s" not in r and "peak_alloc_gib" not in r
                assert "ratio_alloc" not in r
    assert "| model |" in "\n".join(scale_table(report))


def test_deepspeed_choices_are_skipped_without_it():
    cfg = load_config(MODELS["tiny_cpu"][0])
    p = plan(cfg, gpus=4, gpu_memory_gb=80.0)  # several GPUs: ZeRO 1-3 choices fit too
    by = {(c.zero_stage, c.offload, c.activation_checkpointing): c for c in p.choices}
    assert skip_reason(by[(0, "none", False)], have_deepspeed=False) is None
    for key in ((1, "none", False), (3, "optimizer_and_params", True)):
        reason = skip_reason(by[key], have_deepspeed=False)
        assert reason.startswith("skipped: ZeRO-") and "needs DeepSpeed" in reason
        assert skip_reason(by[key], have_deepspeed=True) is None


def test_no_budget_skips_every_model(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["--models", "swinv2_g", "swin_l", "--budget-s", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["swinv2_g", "swin_l"]
    assert all(r["status"].startswith("skipped: time budget") for r in rows)


if __name__ == "__main__":
    sys.exit(main())
