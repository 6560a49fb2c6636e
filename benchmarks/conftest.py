"""Benchmark plumbing: pick the device, collect results, print a table at the end.

With CUDA the fused kernels run compiled at the full SimMIM sizes; without it they run in Triton's
interpreter at tiny sizes, which only proves that the suite works (CPU timings mean nothing).
"""
import pytest
import torch

from _device import ON_GPU

# (case, variant) -> dict(time_s=..., min_bytes=..., order=...), filled by the benchmarks.
RESULTS = {}
# The targets on one H100 (seconds, forward + backward, B = 128).
TARGETS = {("swin_b 48x48x128 bf16", "fused"): 0.13e-3, ("swin 3x192x192 p4 bf16", "fused"): 0.05e-3}


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default pattern is test_*.py; a file named on
    the command line is collected anyway)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def results():
    return RESULTS


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: gpu_check.sh prints from here on
def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    device = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter; timings mean nothing)"
    tr = terminalreporter
    tr.write_sep("=", f"SimMIM ops, forward + backward, median per call, {device}")
    header = f"{'case':34s} {'variant':16s} {'time ms':>9s} {'GB/s*':>8s} {'vs eager':>9s} {'vs compiled':>11s}"
    tr.write_line(header)
    for case in sorted({c for c, _ in RESULTS}):
        eager = RESULTS.get((case, "reference"), {}).get("time_s")
        compiled = RESULTS.get((case, "compiled_ref"), {}).get("time_s")
        for (c, variant), r in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], kv[1]["order"])):
            if c != case:
                continue
            t = r["time_s"]
            gbs = r["min_bytes"] / t / 1e9
            vs_e = f"{eager / t:8.2f}x" if eager else "-"
            vs_c = f"{compiled / t:10.2f}x" if compiled else "-"
            tr.write_line(f"{case:34s} {variant:16s} {t * 1e3:9.4f} {gbs:8.1f} {vs_e:>9s} {vs_c:>11s}")
    if ON_GPU:
        for (case, variant), limit in TARGETS.items():
            r, c = RESULTS.get((case, variant)), RESULTS.get((case, "compiled_ref"))
            if r is None:
                continue
            met = r["time_s"] <= limit and (c is None or r["time_s"] < c["time_s"])
            tr.write_line(f"target {case} {variant}: <= {limit * 1e3:.3f} ms and faster than compiled_ref: "
                          f"{'met' if met else 'NOT met'} ({r['time_s'] * 1e3:.4f} ms)")
    tr.write_line("* GB/s against the minimum bytes: each input read once, each output written once "
                  "(the fused L1 loss skips unmasked pixels, so it can exceed the copy bandwidth).")
