"""The compiled (non-interpreted) kernels build for an H100, for every launch the ops make.

kernels/tests/sm90_compile.py runs in a subprocess without TRITON_INTERPRET, records each launch the host
code makes, specialises it as Triton's JIT would, and compiles it to PTX and a cubin (Triton's
compiler and ptxas run without a GPU). The bandwidth-critical launches must use vector loads and
stores (16-byte accesses where alignment allows); without them the kernels fall short of the
memory bandwidth the speed targets assume.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
except ImportError:
    pytest.skip("this triton has no NVIDIA backend", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if results and "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    return results


def test_every_launch_compiles_for_sm90(launches):
    assert len(launches) >= 30
    failed = [(r["case"], r["kernel"], r["error"]) for r in launches if "error" in r]
    assert not failed, failed
    assert all(r["cubin"] > 0 for r in launches)


SWIN_SUB = "substitute (2, 48, 48, 128) torch.bfloat16 mask torch.bool token torch.float32"
VIT_SUB = "substitute (2, 196, 768) torch.bfloat16 mask torch.bool token torch.float32"
SWIN_L1 = "l1 (2, 3, 192, 192) p4 torch.bfloat16 target torch.float32 shuffle 1"
VIT_L1 = "l1 (2, 3, 224, 224) p16 torch.bfloat16 target torch.float32 shuffle 1"


@pytest.mark.parametrize("case,kernel,stores", [
    (f"{SWIN_SUB} fwd", "_mask_substitute_fwd_kernel", True),
    (f"{SWIN_SUB} bwd", "_mask_substitute_bwd_kernel", True),
    (f"{VIT_SUB} fwd", "_mask_substitute_fwd_kernel", True),
    (f"{SWIN_L1} fwd", "_masked_l1_fwd_kernel", False),
    (f"{SWIN_L1} bwd", "_masked_l1_bwd_kernel", True),
    (f"{VIT_L1} fwd", "_masked_l1_fwd_kernel", False),
])
def test_bandwidth_critical_launches_vectorise(launches, case, kernel, stores):
    (r,) = [r for r in launches if r["case"] == case and r["kernel"] == kernel]
    assert r["vector_loads"] > 0, r
    if stores:
        assert r["vector_stores"] > 0, r


WINDOW_CASES = {
    "swin_b_bf16": "window 6 shift 3 (2, 48, 48, 384) heads 4 torch.bfloat16",
    "swin_b_fp32": "window 6 shift 3 (2, 48, 48, 384) heads 4 torch.float32",
    "swin_l_bf16": "window 12 shift 6 (2, 48, 48, 576) heads 6 torch.bfloat16",
    "swin_l_fp32": "window 12 shift 6 (2, 48, 48, 576) heads 6 torch.float32",
}


@pytest.mark.parametrize("case", WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
def test_window_attention_launches_compile(launches, case):
    runs = [r for r in launches if r["case"].startswith(case)]
    assert {(r["case"][len(case) + 1:], r["kernel"]) for r in runs} == {
        ("fwd", "_window_attention_fwd_kernel"), ("bwd", "_window_attention_bwd_kernel"),
        ("bwd", "_sum_partials_kernel")}
    assert all("error" not in r and 0 < r["registers"] <= 255 for r in runs), runs


@pytest.mark.parametrize("direction,kernel", [("fwd", "_window_attention_fwd_kernel"),
                                              ("bwd", "_window_attention_bwd_kernel")])
def test_window_attention_swin_b_bf16_does_not_spill(launches, direction, kernel):
    """The main training case (Swin-B, window 6, bf16): its kernels fit in registers."""
    (r,) = [r for r in launches if r["case"] == f"{WINDOW_CASES['swin_b_bf16']} {direction}" and r["kernel"] == kernel]
    assert r["stack_bytes"] == 0 and r["spill_store_bytes"] in (0, -1), r
