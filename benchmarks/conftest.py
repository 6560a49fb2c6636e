"""Benchmark plumbing: pick the device, collect results, print a table at the end.

With CUDA the fused kernels run compiled at the full SimMIM sizes; without it they run in Triton's
interpreter at tiny sizes, which only proves that the suite works (CPU timings mean nothing).

Two environment variables serve benchmarks/gpu_all.sh:
- SIMMIM_BENCH_JSON=path: the results so far are rewritten there after every test, so a run cut
  short by its time limit keeps what it measured.
- SIMMIM_BENCH_DEADLINE=unix seconds: tests that would start later are skipped ("time budget")
  instead of being killed half-way.
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from _device import ON_GPU

# (case, variant) -> dict(suite=..., time_s=..., min_bytes=..., order=..., [status=...]), filled by the benchmarks.
RESULTS = {}
# The targets on one H100 (seconds, forward + backward, B = 128).
TARGETS = {("swin_b 48x48x128 bf16", "fused"): 0.13e-3, ("swin 3x192x192 p4 bf16", "fused"): 0.05e-3}
# the variants each row is compared with: plain PyTorch eager and torch.compile of it
EAGER_BASELINES = ("reference", "timm_eager")
COMPILED_BASELINES = ("compiled_ref", "timm_compiled")
_DEADLINE = float(os.environ.get("SIMMIM_BENCH_DEADLINE") or 0)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default pattern is test_*.py; a file named on
    the command line is collected anyway)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def results():
    return RESULTS


def _params(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


@pytest.fixture(autouse=True)
def _time_budget(request):
    if _DEADLINE and time.time() > _DEADLINE:
        p = _params(request.node)
        if "case" in p and "variant" in p:
            RESULTS[(p["case"], p["variant"])] = dict(suite=request.module.__name__.replace("bench_", ""),
                                                      status="skipped: time budget", order=99)
        pytest.skip("time budget (SIMMIM_BENCH_DEADLINE) is spent")


def result_rows():
    """RESULTS as a JSON-ready list."""
    return [dict(case=c, variant=v, **r) for (c, v), r in RESULTS.items()]


def pytest_runtest_logfinish(nodeid, location):
    path = os.environ.get("SIMMIM_BENCH_JSON")
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({"device": torch.cuda.get_device_name() if ON_GPU else "cpu",
                                   "results": result_rows()}, indent=1))
        tmp.replace(path)


def _baseline(case, names):
    for name in names:
        t = RESULTS.get((case, name), {}).get("time_s")
        if t:
            return t
    return None


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    device = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter; timings mean nothing)"
    tr = terminalreporter
    tr.write_sep("=", f"SimMIM ops, forward + backward, median per call, {device}")
    header = f"{'case':44s} {'variant':16s} {'time ms':>9s} {'GB/s*':>8s} {'vs eager':>9s} {'vs compiled':>11s}"
    tr.write_line(header)
    for case in sorted({c for c, _ in RESULTS}):
        eager, compiled = _baseline(case, EAGER_BASELINES), _baseline(case, COMPILED_BASELINES)
        for (c, variant), r in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], kv[1]["order"])):
            if c != case:
                continue
            t = r.get("time_s")
            if not t:
                tr.write_line(f"{case:44s} {variant:16s} {r.get('status', 'not measured')}")
                continue
            gbs = f"{r['min_bytes'] / t / 1e9:8.1f}" if r.get("min_bytes") else "       -"
            vs_e = f"{eager / t:8.2f}x" if eager else "-"
            vs_c = f"{compiled / t:10.2f}x" if compiled else "-"
            tr.write_line(f"{case:44s} {variant:16s} {t * 1e3:9.4f} {gbs} {vs_e:>9s} {vs_c:>11s}")
    if ON_GPU:
        for (case, variant), limit in TARGETS.items():
            r, c = RESULTS.get((case, variant)), RESULTS.get((case, "compiled_ref"))
            if r is None or not r.get("time_s"):
                continue
            met = r["time_s"] <= limit and (c is None or r["time_s"] < c["time_s"])
            tr.write_line(f"target {case} {variant}: <= {limit * 1e3:.3f} ms and faster than compiled_ref: "
                          f"{'met' if met else 'NOT met'} ({r['time_s'] * 1e3:.4f} ms)")
    tr.write_line("* GB/s against the bytes the case counts: the kernels' minimum (each input read once, each "
                  "output written once; the fused L1 loss skips unmasked pixels, so it can exceed the copy "
                  "bandwidth); attention: the bytes model of benchmarks/attention_bytes.py.")
