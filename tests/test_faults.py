"""Fault injection: corrupt checkpoints, a full disk, kill -9 during a save, non-finite losses, signals,
vanishing data files and two runs on one output dir. In every case nothing is silently used or lost:
the run falls back to the newest verified checkpoint (with a warning) or stops with one error line.

Tiny model, few steps, engine.mode torch (DeepSpeed is not the point here, except where named)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_subprocess import ROOT, deepspeed_launcher, one_thread, requires_deepspeed, run, subprocess_env  # noqa: F401
from simmim_fast.cli import train_main as cli

# 4 steps per epoch on the 19 sample photos at micro batch 4, a checkpoint every 3 steps.
ARGS = ["--config", "configs/swin_tiny_cpu.json",
        "--set", "model.img_size=64", "--set", "model.embed_dim=16", "--set", "model.depths=[1,1,1,1]",
        "--set", "model.num_heads=[1,2,2,4]", "--set", "model.window_size=4", "--set", "model.drop_path_rate=0.1",
        "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4", "--set", "train.epochs=10",
        "--set", "train.warmup_epochs=1", "--set", "train.base_lr=0.05",
        "--set", "data.num_workers=0", "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep_last=3",
        "--set", "logging.print_every=1", "--set", "logging.tensorboard=false", "--set", "logging.loss_curve=false",
        "--set", "logging.visualize_every=0", "--set", "engine.mode=torch", "--set", "engine.zero_stage=0"]


def steps(n):
    return ARGS + ["--set", f"train.max_steps={n}"]


def losses(out):
    from simmim_fast.engine.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 6-step run (checkpoints at 3 and 6): its losses and output dir (copied by each test)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli(steps(6) + ["--output-dir", str(out)]) == 0
    torch.set_num_threads(n)
    return out, losses(out)


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:max(0, int(len(data) * keep))])


# ------------------------------------------------------------------ corrupt checkpoints
PARTS = ["model.pt", "optimizer.pt", "trainer_state.json", "config.json", "rng/rank_00000.pt"]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_corrupt_latest_falls_back_with_a_warning(reference, tmp_path, capsys, part, damage):
    from simmim_fast import load_config
    from simmim_fast.engine.run import resolve_resume
    out = _copy(reference, tmp_path)
    bad = out / "checkpoints/step_00000006" / part
    _truncate(bad) if damage == "truncated" else bad.unlink()
    cfg = load_config(str(out / "config.json"))
    picked = resolve_resume("auto", out, cfg)
    assert picked == out / "checkpoints/step_00000003"
    err = capsys.readouterr().err
    assert "warning:" in err and "step_00000006" in err and part.split("/")[-1] in err, err

    # an explicit --resume of the bad checkpoint: one error line naming the file, exit 2
    assert cli(steps(6) + ["--output-dir", str(tmp_path / "new"), "--resume", str(out / "checkpoints/step_00000006")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and part.split("/")[-1] in err, err


def test_fallback_resume_is_bit_identical(reference, tmp_path, capsys, one_thread):
    out = _copy(reference, tmp_path)
    _truncate(out / "checkpoints/step_00000006/model.pt")
    assert cli(steps(6) + ["--output-dir", str(out)]) == 0
    text = capsys.readouterr()
    assert "resumed from" in text.out and "at step 3" in text.out
    assert losses(out) == reference[1]
    from simmim_fast.engine.checkpoint import verify_checkpoint
    verify_checkpoint(out / "checkpoints/step_00000006")  # written again, whole


def test_every_checkpoint_corrupt_is_one_error(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    for tag in ("step_00000003", "step_00000006"):
        _truncate(out / "checkpoints" / tag / "optimizer.pt")
    assert cli(steps(6) + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "no usable checkpoint" in err and "step_00000003" in err, err


def test_checkpoint_without_manifest_is_checked_for_its_files(reference, tmp_path, capsys):
    """Checkpoints written before manifests existed: resumed, with a note that the contents are not verified;
    a missing file still makes them unusable."""
    from simmim_fast import load_config
    from simmim_fast.engine.run import resolve_resume
    out = _copy(reference, tmp_path)
    for tag in ("step_00000003", "step_00000006"):
        (out / "checkpoints" / tag / "manifest.json").unlink()
    cfg = load_config(str(out / "config.json"))
    assert resolve_resume("auto", out, cfg) == out / "checkpoints/step_00000006"
    assert "no manifest" in capsys.readouterr().err
    (out / "checkpoints/step_00000006/rng/rank_00000.pt").unlink()
    assert resolve_resume("auto", out, cfg) == out / "checkpoints/step_00000003"
    assert "rank_00000.pt" in capsys.readouterr().err


def test_tools_refuse_a_corrupt_checkpoint_in_one_line(reference, tmp_path, capsys):
    from simmim_fast.cli import main
    out = _copy(reference, tmp_path)
    _truncate(out / "checkpoints/step_00000006/model.pt")
    assert main(["export", str(out / "checkpoints/step_00000006"), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.pt" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ non-finite losses
def _strict_records(out):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_nan_stop_is_one_error_line_with_exit_3(tmp_path, capsys, one_thread):
    from simmim_fast.errors import EXIT_NONFINITE
    out = tmp_path / "run"
    # an absurd learning rate: the first steps are finite, their updates blow the weights up
    rc = cli(steps(6) + ["--output-dir", str(out), "--set", "train.base_lr=1e30", "--set", "checkpoint.every_steps=1"])
    assert rc == EXIT_NONFINITE == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    bad = int(re.search(r"non-finite loss at step (\d+)", err).group(1))
    assert f"step_{bad - 1:08d}" in err and "train.base_lr" in err, err
    assert (out / "checkpoints/latest").read_text().strip() == f"step_{bad - 1:08d}"  # nothing saved after it
    recs = _strict_records(out)
    assert recs[-1]["step"] == bad and recs[-1]["loss"] is None


def test_nan_skip_shows_skipped_steps_and_writes_strict_json(tmp_path, capsys, one_thread):
    from simmim_fast.errors import EXIT_NONFINITE
    out = tmp_path / "run"
    rc = cli(steps(6) + ["--output-dir", str(out), "--set", "train.base_lr=1e30", "--set", "train.nan_policy=skip",
                         "--set", "train.max_skipped_steps=2"])
    assert rc == EXIT_NONFINITE
    text = capsys.readouterr()
    assert text.err.startswith("error: ") and text.err.count("\n") == 1 and "2 steps in a row" in text.err, text.err
    progress = [line for line in text.out.splitlines() if line.startswith("[") and "loss skipped" in line]
    assert len(progress) == 2 and all("0.0000" not in line for line in progress), text.out
    recs = _strict_records(out)
    skipped = [r["step"] for r in recs if r["skipped"]]
    assert len(skipped) == 2 and recs[-1]["step"] == skipped[-1] and all(r["loss"] is None for r in recs[-2:])


# ------------------------------------------------------------------ tools and data: one error line each
def _one_error_line(capsys, argv):
    from simmim_fast.cli import main
    assert main(argv) == 2, (argv, capsys.readouterr())
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    return err


def test_tools_bad_input_is_one_error_line(reference, tmp_path, capsys):
    from PIL import Image

    from simmim_fast.cli import main
    from simmim_fast.data.samples import sample_photo_paths
    out = str(reference[0])
    (tmp_path / "empty").mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    text = tmp_path / "not_an_image.png"
    text.write_text("hello\n")
    photo = str(sample_photo_paths()[0])
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    combined = ["--combined", str(tmp_path / "c.png")]
    assert "no checkpoint" in _one_error_line(capsys, ["export", str(tmp_path / "empty"), "-o", str(tmp_path / "e")])
    assert "no checkpoint" in _one_error_line(capsys, ["visualize", str(tmp_path / "empty")] + combined)
    assert "a_file" in _one_error_line(capsys, ["export", out, "-o", str(blocker / "sub" / "e")])
    assert "not_an_image" in _one_error_line(capsys, ["visualize", out, "--images", str(text)] + combined)
    assert "not_an_image" in _one_error_line(capsys, ["visualize", out, "--images", photo, "--mask", str(text)]
                                             + combined)
    assert "a_file" in _one_error_line(capsys, ["visualize", out, "--images", photo, "--combined",
                                                str(blocker / "c.png")])
    assert "--mask" in _one_error_line(capsys, ["visualize", out, "--images", photo, photo, "--mask", str(mask),
                                                str(mask), str(mask)] + combined)
    assert "--snap-size" in _one_error_line(capsys, ["visualize", out, "--images", photo, "--mask", str(mask),
                                                     "--snap-size", "7"] + combined)
    assert main(["export", out, "-o", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    for suffix in (".pth", ".safetensors"):  # a truncated state file
        _truncate(tmp_path / f"w{suffix}")
        assert f"w{suffix}" in _one_error_line(capsys, ["visualize", str(tmp_path / f"w{suffix}"), "--config",
                                                        str(reference[0] / "config.json")] + combined)


def test_exports_follow_the_umask(reference, tmp_path, capsys):
    import stat

    from simmim_fast.cli import main
    old = os.umask(0o027)
    try:
        assert main(["export", str(reference[0]), "-o", str(tmp_path / "w")]) == 0
    finally:
        os.umask(old)
    modes = {suffix: oct(stat.S_IMODE((tmp_path / f"w{suffix}").stat().st_mode))
             for suffix in (".safetensors", ".pth", ".json")}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_broken_symlink_is_listed_as_unusable(tmp_path, capsys):
    from data_helpers import make_photo_tree
    root = tmp_path / "ds"
    make_photo_tree(root, 4)
    (root / "class_a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    from simmim_fast.cli import main
    assert main(["scan", str(root), "--cache-dir", str(tmp_path / "cache"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "scanned 5 files" in out and "would skip: 1" in out and "gone.jpg: broken link" in out, out


def test_unusable_dataset_is_refused_before_the_engine_starts(tmp_path, capsys, monkeypatch):
    from data_helpers import make_photo_tree
    import simmim_fast.engine.run as engine_run

    def no_engine(*a, **k):
        raise AssertionError("the engine was started")
    monkeypatch.setattr(engine_run, "init_distributed", no_engine)
    root = tmp_path / "ds"
    make_photo_tree(root, 4)
    for i in range(5):
        (root / "class_a" / f"junk_{i}.jpg").write_text("not an image\n")
    err = _one_error_line(capsys, ["pretrain", "--config", "configs/swin_tiny_cpu.json", "--data-path", str(root),
                                   "--output-dir", str(tmp_path / "o"), "--set", f"data.cache_dir=\"{tmp_path}\"",
                                   "--set", "train.micro_batch_size=1", "--set", "train.global_batch_size=1"])
    assert "5 of 9 files" in err and "junk_0.jpg" in err and "junk_1.jpg" in err, err


# ------------------------------------------------------------------ kill -9, full disk, signals (subprocesses)
def _last_step(out):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def _start(args, out, **env):
    cmd = [sys.executable, str(ROOT / "tests/fault_worker.py")] + args + ["--output-dir", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(cond, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert cond(), f"condition not reached (exit {proc.poll()})"


def _finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def test_kill_9_during_a_save_and_a_second_run_meanwhile(reference, tmp_path, capsys, one_thread):
    """A run hangs half-way through a save: a second run on its output dir is refused (the lock); the first is
    killed with kill -9; the next run takes the dead run's lock over and resumes from the previous checkpoint."""
    out = tmp_path / "run"
    marker = tmp_path / "in_save"
    proc = _start(steps(6), out, FAULT="hang_in_save:6", FAULT_MARKER=str(marker))
    try:
        _wait_for(marker.exists, proc)
        assert cli(steps(6) + ["--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "in use by another run" in err and f"pid {proc.pid}" in err, err
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up code runs
        _finish(proc)
    ck = out / "checkpoints"
    assert (ck / ".partial-step_00000006").is_dir() and (ck / "latest").read_text().strip() == "step_00000003"
    assert (out / "run.lock").read_text().startswith(f"pid {proc.pid}")  # the file stays; its lock died
    assert cli(steps(6) + ["--output-dir", str(out)]) == 0
    assert "at step 3" in capsys.readouterr().out
    assert losses(out) == reference[1] and not (ck / ".partial-step_00000006").exists()


def test_full_disk_during_save_keeps_the_previous_checkpoint(reference, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    rc, _, err = _finish(_start(steps(6), out, FAULT="enospc:6"))
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: could not write the checkpoint of step 6") and "No space left" in last, err
    assert "step_00000003" in last and "Traceback" not in err, err
    ck = out / "checkpoints"
    assert not (ck / ".partial-step_00000006").exists() and (ck / "latest").read_text().strip() == "step_00000003"
    assert cli(steps(6) + ["--output-dir", str(out)]) == 0  # space is back: resume from the intact checkpoint
    assert losses(out) == reference[1]


SIG_ARGS = ["--set", "checkpoint.every_steps=1000", "--set", "checkpoint.save_at_end=false"]


@pytest.fixture(scope="module")
def reference20(tmp_path_factory):
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref20") / "run"
    assert cli(steps(20) + SIG_ARGS + ["--output-dir", str(out)]) == 0
    torch.set_num_threads(n)
    return losses(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_and_resumes_bit_identical(reference20, tmp_path, capsys, one_thread, sig):
    from simmim_fast.errors import exit_code_for_signal
    out = tmp_path / "run"
    proc = _start(steps(20) + SIG_ARGS, out)
    _wait_for(lambda: _last_step(out) >= 3, proc)
    os.kill(proc.pid, sig)
    rc, text, err = _finish(proc)
    assert rc == exit_code_for_signal(sig) == 128 + sig, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0] and "Traceback" not in err, err
    step = int(re.search(r"after step (\d+)", stopped[0]).group(1))
    assert 3 <= step < 20 and (out / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    if sig == signal.SIGINT:
        return  # the same stop as SIGTERM's: its resume is checked there
    assert cli(steps(20) + SIG_ARGS + ["--output-dir", str(out)]) == 0
    assert f"at step {step}" in capsys.readouterr().out
    assert losses(out) == reference20


def test_second_sigint_exits_at_once(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "in_save"
    proc = _start(steps(6), out, FAULT="hang_in_save:3", FAULT_MARKER=str(marker))
    _wait_for(marker.exists, proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    rc, _, err = _finish(proc, timeout=30)
    assert rc == 130 and "second interrupt" in err and "Traceback" not in err, err
    assert not (out / "checkpoints/latest").exists()


@requires_deepspeed
def test_two_ranks_stop_together_when_only_one_gets_sigterm(tmp_path):
    """DeepSpeed ZeRO-1, two gloo ranks: SIGTERM to rank 1 alone; both ranks stop after the same step (rank 0
    reports it), the checkpoint is complete, and the resumed run gives the uninterrupted run's losses."""
    import psutil
    args = steps(12) + SIG_ARGS + ["--set", "engine.mode=deepspeed", "--set", "engine.zero_stage=1",
                                   "--set", "train.global_batch_size=8"]

    def train(out):  # deepspeed_launcher() picks a free rendezvous port per launch
        return (deepspeed_launcher() + ["--num_gpus", "2", str(ROOT / "train.py")]
                + args + ["--output-dir", str(out)])
    run(train(tmp_path / "full"), timeout=400)
    reference = losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 13))

    out = tmp_path / "cut"
    proc = subprocess.Popen(train(out), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: _last_step(out) >= 3, proc, timeout=400)
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if any(a.startswith("--local_rank=1") for a in c.cmdline())]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    _, text, err = _finish(proc, timeout=300)
    stopped = [line for line in (text + err).splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, text[-3000:] + err[-3000:]  # printed by rank 0, which got no signal
    step = int(re.search(r"after step (\d+)", stopped[0]).group(1))
    assert (out / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    from simmim_fast.engine.checkpoint import verify_checkpoint
    verify_checkpoint(out / "checkpoints" / f"step_{step:08d}")  # both ranks' RNG files, DeepSpeed's files
    resumed = run(train(out), timeout=400).stdout
    assert f"at step {step}" in resumed
    assert losses(out) == reference


def test_dataset_file_vanishing_mid_run_is_skipped_and_named(tmp_path, monkeypatch, one_thread):
    """A file deleted and another overwritten with garbage after step 1: later epochs read stand-ins for both,
    the run finishes, and data_skipped_rank0.tsv names them."""
    from data_helpers import make_photo_tree
    import simmim_fast.jobs.pretrain as pretrain
    files = make_photo_tree(tmp_path / "ds", 8, max_side=96)
    gone, garbled = files[1], files[2]

    def damage(ctx):
        def callback(state):
            if state.step == 1:
                gone.unlink()
                garbled.write_bytes(garbled.read_bytes()[:200] + bytes(range(256)) * 8)
        return callback
    monkeypatch.setattr(pretrain, "_reconstructions", damage)
    out = tmp_path / "run"
    rc = cli(steps(8) + ["--data-path", str(tmp_path / "ds"), "--output-dir", str(out),
                         "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                         "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2"])
    assert rc == 0 and losses(out).keys() == set(range(1, 9))
    skipped = (out / "data_skipped_rank0.tsv").read_text()
    assert str(gone) in skipped and str(garbled) in skipped, skipped


# ------------------------------------------------------------------ JPEGs with decoder warnings: one rule everywhere
def _jpegs_with_decoder_warnings(root):
    """A good JPEG, one with random bytes in its entropy-coded data, one cut and given an end-of-image marker."""
    import numpy as np
    from data_helpers import photo
    root.mkdir(parents=True, exist_ok=True)
    photo("chelsea.png").convert("RGB").save(root / "good.jpg", quality=90)
    good = (root / "good.jpg").read_bytes()
    sos = good.find(b"\xff\xda")
    mid = bytearray(good)
    at = sos + (len(good) - sos) // 2
    mid[at:at + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    (root / "corrupt_middle.jpg").write_bytes(bytes(mid))
    (root / "cut_with_eoi.jpg").write_bytes(good[:at] + b"\xff\xd9")
    return root / "corrupt_middle.jpg", root / "cut_with_eoi.jpg"


@pytest.mark.parametrize("check", ["header", "decode"])
def test_jpeg_decoder_warnings_are_corrupt_for_every_check(tmp_path, check):
    from simmim_fast.data.index import BAD, check_image_file
    for path in _jpegs_with_decoder_warnings(tmp_path):
        result = check_image_file(path, check)
        assert result.status == BAD and result.reason.startswith("corrupt JPEG data"), (path.name, result)
    assert check_image_file(tmp_path / "good.jpg", check).status != BAD


def test_every_backend_skips_the_same_corrupt_jpegs(tmp_path, capsys):
    from data_helpers import data_config, make_photo_tree
    from simmim_fast.cli import main
    from simmim_fast.data import PretrainLoader
    root = tmp_path / "ds"
    make_photo_tree(root / "photos", 6, max_side=96)
    bad = _jpegs_with_decoder_warnings(root / "odd")
    assert main(["scan", str(root), "--cache-dir", str(tmp_path / "c0"), "--check", "decode", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 corrupt JPEG data" in out and all(f"{p}: corrupt JPEG data" in out for p in bad), out
    backends = ["torch"]
    try:
        from simmim_fast.data.dali_loader import import_dali
        import_dali()
        backends.append("dali_cpu")
    except ImportError:
        pass
    for backend in backends:
        loader = PretrainLoader(data_config(root, tmp_path / backend, backend=backend, max_skipped_fraction=0.5))
        try:
            unusable = {str(loader.index.paths[i]) for i in loader.index.bad}
            assert unusable == {str(p) for p in bad}, (backend, unusable)
            for _ in loader.epoch(0):
                pass
            assert loader.stats()["unusable_files"] == 2  # nothing else found during the epoch
        finally:
            loader.close()
