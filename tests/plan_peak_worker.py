"""Measure the real peak memory of SimMIM training steps on the CPU (test_plan.py calls ``measure``
in its own process after ``return_freed_memory_at_once``; as a script it runs in a fresh one).

    MALLOC_MMAP_THRESHOLD_=4096 MALLOC_TRIM_THRESHOLD_=0 \
        python tests/plan_peak_worker.py '[[CONFIG, MICRO_BATCH, CHECKPOINTING, [OVERRIDES]], ...]'

Plain PyTorch, fp32, one process: torch's foreach AdamW with the config's param groups, gradient
clipping, two optimiser steps (the first creates the Adam states and the libraries' lazy state).
Peak = the bytes resident when the second step starts (parameters, buffers and Adam states: their
tensor sizes) + how far the process's resident set rises during the second step: ``VmHWM`` (the
high-water mark of resident memory, /proc/self/status) after the step minus ``VmRSS`` before it,
the mark reset (writing 5 to /proc/self/clear_refs) at the step's start. The rise is what the
operating system saw: activations, gradients, optimiser temporaries and what the C allocator holds
beyond them. glibc must return freed tensor memory to the OS at once (``mallopt`` M_MMAP_THRESHOLD
4096 and M_TRIM_THRESHOLD 0, or the MALLOC_* variables above), otherwise the mark would also hold
freed-but-kept heap.
"""
import contextlib
import ctypes
import gc
import json
import sys

import torch

from simmim_fast.config import load_config
from simmim_fast.engine.optim import build_adamw
from simmim_fast.models import SimMIM
from simmim_fast.tools.plan import _checkpoint_blocks
from simmim_fast.weights import simmim_param_groups


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def return_freed_memory_at_once():
    """glibc: serve every allocation of 4 KiB or more by mmap (freed = given back) and trim the heap
    at once; the defaults (128 KiB, as glibc starts) afterwards."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 4096)
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)


def measure(config: str, batch: int, ckpt: bool, overrides) -> dict:
    cfg = load_config(config, overrides=overrides)
    torch.manual_seed(0)
    m = cfg.model
    tokens = m.img_size // m.patch_size
    model = SimMIM.from_config(cfg).train()
    if ckpt:
        _checkpoint_blocks(model)
    opt = build_adamw(simmim_param_groups(model, cfg), cfg.train, torch.device("cpu"), "torch_foreach")
    for step in range(2):
        if step == 1:
            gc.collect()
            resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            resident += sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor))
            rss_before = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        images = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
        mask = (torch.rand(batch, tokens, tokens) < 0.6).to(torch.uint8)
        loss = model(images, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad or 1e9, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss, images, mask
    rise = _status("VmHWM") - rss_before
    return {"peak_bytes": resident + rise, "resident_bytes": resident, "step_rise_bytes": rise,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    """argv[1]: a JSON list of [config, micro batch, checkpointing, [overrides]]; one JSON line each."""
    torch.set_num_threads(1)
    for config, batch, ckpt, overrides in json.loads(sys.argv[1]):
        print(json.dumps(measure(config, batch, ckpt, overrides)), flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
