#!/usr/bin/env python
"""One engine variant's training step rate on synthetic tensors already on the device.

    python benchmarks/engine_speed.py --model swin_b --variant ds1 --json out.json
    python benchmarks/engine_speed.py --model tiny --variant ds2 --steps 20           # CPU: host overhead

Variants: torch (plain PyTorch, the yardstick) or ds0..ds3 (DeepSpeed ZeRO stage), each eager or
compiled (--compile). The step is the engine's own (simmim_fast.engine.backends), so this measures
exactly what train.py runs, minus the data loader. Prints and writes JSON: img/s (median of timed
windows), step time, peak device memory, warm-up (compile) seconds, host syncs per step (value reads
of tensors on the training device: Tensor.item / __bool__ / tolist / cpu(); each stops the host from
running ahead of the GPU; on the CPU every read counts, including the optimiser's step counters),
and the aten ops and Python calls of one step (deterministic measures of the host work).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simmim_fast import SimMIM, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "swin_b": (ROOT / "configs/swin_b.json", []),
    "swin_l": (ROOT / "configs/swin_l.json", []),
    # Swin-B's depth (so every per-parameter/per-module cost of an engine is there) at toy width: on the
    # CPU the step time is then mostly host work, which is what an engine adds.
    "tiny": (ROOT / "configs/swin_b.json", ["model.embed_dim=16", "model.num_heads=[1,2,4,8]", "model.img_size=64",
                                           "model.window_size=4", "mask.mask_patch_size=16"]),
    # the CPU config (depths 1-1-2-1, width 32, 96 px): a smoke run of benchmarks/gpu_all.sh's logic
    "tiny_cpu": (ROOT / "configs/swin_tiny_cpu.json", []),
    # large-model pretraining (benchmarks/bench_scale.py) and its CPU stand-in
    "swinv2_h": (ROOT / "configs/swinv2_h.json", []),
    "swinv2_g": (ROOT / "configs/swinv2_g.json", []),
    "swinv2_tiny_cpu": (ROOT / "configs/swinv2_tiny_cpu.json", []),
}


@contextlib.contextmanager
def count_host_work():
    """Aten ops dispatched (each is a kernel launch or more on a GPU) and Python function calls in a block:
    deterministic measures of the host work an engine adds, unlike timings on a shared CPU."""
    import threading

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"aten_ops": 0, "python_calls": 0}

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["aten_ops"] += 1
            return func(*args, **(kwargs or {}))

    def prof(frame, event, arg):
        if event == "call":
            counts["python_calls"] += 1
    sys.setprofile(prof)
    threading.setprofile(prof)
    try:
        with Ops():
            yield counts
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


@contextlib.contextmanager
def count_syncs(device: torch.device):
    counts = {"n": 0}
    names = ("item", "__bool__", "tolist", "cpu", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(fn):
        def inner(self, *a, **k):
            if self.device == device:  # reading a CPU tensor costs no device sync
                counts["n"] += 1
            return fn(self, *a, **k)
        return inner
    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def build_step(model: str, variant: str, batch: int, compile: bool, bf16_weights: bool = False,
               precision: str = "auto", optimizer: str = "auto", overrides=()):
    """(step(), sync(), backend, dist) for one engine variant on synthetic device tensors."""
    from simmim_fast.engine.backends import build_backend
    from simmim_fast.engine.dist import init_distributed
    from simmim_fast.engine.ds_config import resolve_precision
    from simmim_fast.weights import simmim_param_groups
    from simmim_fast.data import PretrainLoader

    path, model_overrides = MODELS[model]
    mode = "torch" if variant == "torch" else "deepspeed"
    stage = 0 if variant == "torch" else int(variant[2])
    cfg = load_config(path, overrides=model_overrides + [
        f"engine.mode={mode}", f"engine.zero_stage={stage}", f"engine.compile={json.dumps(compile)}",
        f"engine.precision={precision}", f"engine.bf16_weights={json.dumps(bf16_weights)}",
        f"engine.optimizer={optimizer}", f"train.micro_batch_size={batch}",
        f"train.global_batch_size={batch}", "data.backend=synthetic"] + list(overrides))
    dist = init_distributed(mode, "auto")
    torch.manual_seed(0)
    # as the pretraining job builds it (engine.activation_checkpointing is the model's switch)
    net = SimMIM.from_config(cfg).set_activation_checkpointing(cfg.engine.activation_checkpointing)
    backend = build_backend(net, simmim_param_groups(net, cfg), cfg, dist,
                            resolve_precision(cfg, dist.device.type))
    batches = PretrainLoader(cfg, dist.rank, dist.world_size, dist.device).epoch(0)
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)

    def step():
        return backend.train_step([next(batches) for _ in range(backend.accumulation)], lr=1e-4)
    return step, sync, backend, dist


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="swin_b")
    ap.add_argument("--variant", choices=["torch", "ds0", "ds1", "ds2", "ds3"], required=True)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16-weights", action="store_true", help="DeepSpeed bf16 mode instead of autocast")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--optimizer", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args(argv)

    from simmim_fast.engine.dist import shutdown

    step, sync, backend, dist = build_step(args.model, args.variant, args.batch, args.compile, args.bf16_weights,
                                           args.precision, args.optimizer, args.overrides)
    cuda = dist.device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        r = step()
    sync()
    warmup_s = time.perf_counter() - t0
    loss_after_warmup = float(r.loss)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    window = 5
    for _ in range(max(1, args.steps // window)):
        sync()
        t = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        times.append((time.perf_counter() - t) / window)
    with count_syncs(dist.device) as c:
        step()
        sync()
    with count_host_work() as work:
        step()
        sync()
    step_s = statistics.median(times)
    res = {
        "model": args.model, "variant": args.variant, "compile": backend.compiled, "precision": backend.precision,
        "bf16_weights": args.bf16_weights, "batch": args.batch, "optimizer": type(backend.optimizer).__name__,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "img_per_s": round(args.batch / step_s, 1), "step_ms": round(step_s * 1000, 2),
        "step_ms_min": round(min(times) * 1000, 2), "warmup_s": round(warmup_s, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
        "host_syncs_per_step": c["n"], "aten_ops_per_step": work["aten_ops"],
        "python_calls_per_step": work["python_calls"], "loss": loss_after_warmup,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.variant != "torch":
        import deepspeed
        res["deepspeed"] = deepspeed.__version__
    if dist.rank == 0:
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    shutdown()
    return res


if __name__ == "__main__":
    main()
