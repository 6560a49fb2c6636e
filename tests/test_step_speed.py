"""benchmarks/step_speed.py, the whole-step benchmark of gpu_all.sh: variants, budget, ratios (no model is built)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_speed  # noqa: E402


def test_variants_are_stock_or_ours():
    assert step_speed.variant_spec("stock_eager")["compiled"] is False
    for v in ("stock_eager", "stock_compiled"):
        assert "model.ops_backend=torch" in step_speed.variant_spec(v)["overrides"]
    assert step_speed.variant_spec("ours") == dict(compiled=True, overrides=[])
    assert step_speed.variant_spec("ours_fused")["overrides"] == ["model.attention=fused"]


def test_no_budget_skips_every_variant_and_keeps_the_json(tmp_path):
    out = tmp_path / "steps.json"
    rc = step_speed.main(["--models", "tiny_cpu", "swin_b", "--budget-s", "0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in ("tiny_cpu", "swin_b")
                                                          for v in step_speed.VARIANTS]
    for r in rows:
        if r["variant"] == "ours_fused" and step_speed.fused_attention_available():
            assert r["status"].startswith("not available in this build (missing: ")
        else:
            assert r["status"].startswith("skipped: time budget"), r


def test_ratios_only_against_a_measured_yardstick():
    rows = [dict(model="a", variant="stock_compiled", status="ok", img_per_s=100.0),
            dict(model="a", variant="ours", status="ok", img_per_s=130.0),
            dict(model="b", variant="stock_compiled", status="skipped: time budget"),
            dict(model="b", variant="ours", status="ok", img_per_s=50.0)]
    step_speed.add_ratios(rows)
    assert rows[1]["ratio_to_stock_compiled"] == 1.3 and rows[0]["ratio_to_stock_compiled"] == 1.0
    assert "ratio_to_stock_compiled" not in rows[3]
