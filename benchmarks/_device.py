"""Where the benchmarks run. Imported by conftest.py before anything imports triton."""
import os
import time

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    # Triton's interpreter runs the kernels on the CPU; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if ON_GPU else "cpu"
# torch.compile backend of the "compiled" variants: inductor (what training uses) unless a CPU
# smoke run of benchmarks/gpu_all.sh asks for a cheaper one (aot_eager: the same tracing, no codegen).
COMPILE_BACKEND = os.environ.get("SIMMIM_BENCH_COMPILE_BACKEND", "inductor")


def sync_timer() -> float:
    """pytest-benchmark's timer: waits for the GPU, so a round times the kernels, not their launch."""
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()
