"""kill -9 mid-run, resume, and get the per-step losses of an uninterrupted run with the same seed."""
import json
import os
import signal
import subprocess
import sys
import time

from engine_subprocess import ROOT, one_thread, requires_deepspeed, run, subprocess_env  # noqa: F401

# A tiny Swin on 64-px crops of the sample photos: 4 steps per epoch, 40 steps, a checkpoint every 3; drop path
# on, so the resumed run must also restore the RNG state to match.
ARGS = ["--config", "configs/swin_tiny_cpu.json",
        "--set", "model.img_size=64", "--set", "model.embed_dim=16", "--set", "model.depths=[1,1,1,1]",
        "--set", "model.num_heads=[1,2,2,4]", "--set", "model.window_size=4", "--set", "model.drop_path_rate=0.1",
        "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4", "--set", "train.epochs=10",
        "--set", "train.warmup_epochs=1", "--set", "train.base_lr=0.05", "--set", "train.max_steps=40",
        "--set", "data.num_workers=0", "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep_last=2",
        "--set", "logging.print_every=1", "--set", "logging.tensorboard=false", "--set", "engine.zero_stage=2"]


def losses(out):
    from simmim_fast.engine.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def last_step(out):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


@requires_deepspeed
def test_kill_and_resume_gives_the_same_losses(tmp_path):
    train = [sys.executable, str(ROOT / "train.py")] + ARGS
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(train + ["--output-dir", str(full)], timeout=300)
    reference = losses(full)
    assert sorted(reference) == list(range(1, 41))

    proc = subprocess.Popen(train + ["--output-dir", str(cut)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while last_step(cut) < 5 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no clean-up code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_step(cut)
    assert 5 <= killed_at < 40, "the run must be killed between a checkpoint and the end"
    saved = int((cut / "checkpoints/latest").read_text().strip()[len("step_"):])  # a complete checkpoint
    assert saved % 3 == 0 and 3 <= saved <= killed_at

    out = run(train + ["--output-dir", str(cut)], timeout=300).stdout  # --resume auto
    assert "resumed from" in out and f"at step {saved}" in out
    assert losses(cut) == reference  # bit-identical per-step losses
    tags = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000039", "step_00000040"]  # keep_last 2
    assert (cut / "loss_curve.png").stat().st_size > 1000


def test_torch_mode_stop_and_resume_in_process(tmp_path, one_thread):
    """engine.mode torch: a run stopped at step 3 and resumed equals an uninterrupted one."""
    from simmim_fast.cli import train_main as cli
    base = ARGS + ["--set", "engine.mode=torch", "--set", "engine.zero_stage=0"]
    steps6 = [a if a != "train.max_steps=40" else "train.max_steps=6" for a in base]
    steps3 = [a if a != "train.max_steps=40" else "train.max_steps=3" for a in base]
    assert cli(steps6 + ["--output-dir", str(tmp_path / "a")]) == 0
    assert cli(steps3 + ["--output-dir", str(tmp_path / "b")]) == 0
    assert cli(steps6 + ["--output-dir", str(tmp_path / "b")]) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 7)) and a == b
    import torch

    from simmim_fast.weights import load_model_state
    cfg, state = load_model_state(tmp_path / "b")
    _, ref = load_model_state(tmp_path / "a" / "checkpoints" / "step_00000006")
    assert cfg.engine.mode == "torch" and set(state) == set(ref)
    assert all(torch.equal(state[k], ref[k]) for k in state)
