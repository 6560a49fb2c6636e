"""A run writes what the README promises: config, metrics, TensorBoard, loss curve, reconstructions, checkpoints."""
import json

import numpy as np
from PIL import Image

from engine_subprocess import one_thread  # noqa: F401
from test_engine_resume import ARGS

from simmim_fast.visualization import PANEL_GAP


def test_run_outputs(tmp_path, one_thread):
    from simmim_fast.cli import train_main as cli
    args = [a if a != "train.max_steps=40" else "train.max_steps=4" for a in ARGS]
    args += ["--set", "engine.mode=torch", "--set", "engine.zero_stage=0", "--set", "logging.visualize_every=2",
             "--set", "logging.tensorboard=true", "--output-dir", str(tmp_path)]
    assert cli(args) == 0
    assert json.loads((tmp_path / "config.json").read_text())["model"]["img_size"] == 64
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in rows if "loss" in r)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert Image.open(tmp_path / "loss_curve.png").size[0] > 100
    grids = sorted((tmp_path / "reconstructions").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000002.png", "step_00000004.png"]
    w, h = Image.open(grids[-1]).size
    assert w == 4 * 64 + 3 * PANEL_GAP and h >= 4 * 64  # 4 panels per row, one row per image of the batch
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
