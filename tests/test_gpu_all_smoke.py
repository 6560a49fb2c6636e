"""benchmarks/gpu_all.sh, the one GPU command, in its CPU smoke mode (SIMMIM_BENCH_TINY=1).

The default test gives the script a budget too small for any part: it must still print the device
line, skip every part saying why, drop what an earlier run left in OUTDIR, and write perf.md /
perf.json. The whole smoke run (every part at tiny sizes, about a minute of CPU time) runs with
SIMMIM_SLOW_TESTS=1.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.skipif(not os.environ.get("SIMMIM_SLOW_TESTS"),
                          reason="about a minute of CPU time; SIMMIM_SLOW_TESTS=1 runs it")


def _run(out: Path, *parts: str, budget: int, timeout: int):
    env = dict(os.environ, SIMMIM_BENCH_TINY="1", SIMMIM_GPU_BUDGET_S=str(budget), OMP_NUM_THREADS="1",
               PYTHON=os.environ.get("PYTHON", "python"))
    env.pop("SIMMIM_BENCH_JSON", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_all.sh"), str(out), *parts], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_part_is_refused(tmp_path):
    r = _run(tmp_path, "bogus", budget=5, timeout=30)
    assert r.returncode == 2 and "unknown part 'bogus'" in r.stdout


def test_no_budget_skips_every_part_and_still_reports(tmp_path):
    (tmp_path / "steps.json").write_text('{"results": [{"model": "stale", "variant": "x"}]}')
    r = _run(tmp_path, budget=5, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch" in r.stdout.splitlines()[0] and "device cpu" in r.stdout.splitlines()[0]
    parts = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == ["steps", "attention", "kernels", "tests"]
    assert all(p["status"].startswith("skipped: time budget") for p in parts), parts
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["steps"] is None and report["target"]["met"] is None      # the stale file was removed
    assert report["env"]["tiny"] is True
    assert {r["model"] for r in report["attention_bytes_per_step"]} == {"swin_b", "swin_l"}
    md = (tmp_path / "perf.md").read_text()
    assert "SIMMIM_BENCH_TINY=1" in md and "stale" not in md and "**not measured**" in md
    assert md == r.stdout[r.stdout.index("# simmim-fast performance run"):].split("total ")[0].rstrip("\n") + "\n"


@SLOW
def test_whole_smoke_run(tmp_path):
    r = _run(tmp_path, budget=900, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "perf.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["ok"] * 4, report["parts"]
    steps = {row["variant"]: row for row in report["steps"]["results"]}
    assert [steps[v]["status"] for v in ("stock_eager", "stock_compiled", "ours")] == ["ok"] * 3
    assert steps["stock_compiled"]["ratio_to_stock_compiled"] == 1.0
    fused_ok = steps["ours_fused"]["status"] == "ok"
    assert fused_ok or steps["ours_fused"]["status"].startswith("not available in this build")
    attention = report["attention"]["results"]
    assert {a["variant"] for a in attention if a.get("time_s")} >= {"timm_eager", "timm_compiled"}
    assert all(a["min_bytes"] > 0 for a in attention if a["variant"] != "timm_compiled")
    assert len([k for k in report["kernels"]["results"] if k.get("time_s")]) == 9
    assert report["tests"]["counts"].get("passed", 0) >= 2 and not report["tests"]["failed"]
    md = (tmp_path / "perf.md").read_text()
    assert "| tiny_cpu | stock_compiled |" in md and "timm_eager" in md and "compiled_ref" in md


def test_optional_scale_part_reports_even_when_skipped(tmp_path):
    (tmp_path / "scale.json").write_text('{"results": [{"model": "stale"}]}')
    r = _run(tmp_path, "scale", budget=5, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    parts = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == ["scale"] and parts[0]["status"].startswith("skipped: time budget")
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["scale"] is None                                           # the stale file was removed
    md = (tmp_path / "perf.md").read_text()
    assert "## Large-model pretraining" in md and "not run |" in md and "stale" not in md
