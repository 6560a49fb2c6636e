"""The online kNN probe (logging.probe): its value is the `knn` tool's on the checkpoint of that step, and it
changes nothing of training: the per-step losses equal a run without it, and kill -9 + resume stays
bit-identical with it on.

A tiny Swin on 64-px crops of the sample photos (engine.mode torch, drop path on so that a disturbed
torch RNG would show in the losses), probed every 2 steps on a generated 3-class ImageFolder with
train/ and val/ (no download), on seeded subsets smaller than the folders.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from simmim_fast.cli import main as cli_main, train_main
from simmim_fast.engine.metrics import read_metrics

from engine_subprocess import ROOT, one_thread, subprocess_env  # noqa: F401
from probe_helpers import BASE, K, PROBE_EVERY, STEPS, TRAIN_LIMIT, VAL_LIMIT, probe_args, write_probe_folder


def records(out):
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def losses(out):
    return {s: r["loss"] for s, r in records(out).items()}


def probes(out):
    return {s: r["probe/knn_top1"] for s, r in records(out).items() if "probe/knn_top1" in r}


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    import torch
    tmp = tmp_path_factory.mktemp("probe")
    folder = write_probe_folder(tmp / "probe_data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(BASE + probe_args(folder) + ["--output-dir", str(tmp / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "run", folder


def test_probe_is_logged_every_n_steps_with_its_cost(probed_run, capsys):
    out, _ = probed_run
    recs = records(out)
    assert sorted(recs) == list(range(1, STEPS + 1))
    probed = sorted(s for s, r in recs.items() if "probe/knn_top1" in r)
    assert probed == list(range(PROBE_EVERY, STEPS + 1, PROBE_EVERY))
    assert all(0.0 <= recs[s]["probe/knn_top1"] <= 100.0 and recs[s]["probe/seconds"] > 0 for s in probed)
    assert all(recs[s]["loss"] is not None for s in probed)  # the probe joined the step's training record


def test_logged_value_equals_the_knn_tool_on_the_same_checkpoint(probed_run, tmp_path, one_thread):
    out, folder = probed_run
    logged = probes(out)
    assert len(set(logged.values())) > 1 or 0 < next(iter(logged.values())) < 100  # not a trivial value
    for step in (6, 12):   # both checkpoints (every 3) and probe steps (every 2)
        js = tmp_path / f"knn{step}.json"
        assert cli_main(["knn", str(out / "checkpoints" / f"step_{step:08d}"), "--data", str(folder),
                         "--train-limit", str(TRAIN_LIMIT), "--val-limit", str(VAL_LIMIT), "--k", str(K),
                         "--seed", "3", "--workers", "0", "--device", "cpu", "--json", str(js)]) == 0
        assert json.loads(js.read_text())["top1"]["last"] == logged[step], step


def test_losses_with_the_probe_equal_a_run_without_it(probed_run, tmp_path, one_thread):
    out, _ = probed_run
    assert train_main(BASE + ["--output-dir", str(tmp_path / "plain")]) == 0
    plain = records(tmp_path / "plain")
    assert not any("probe/knn_top1" in r for r in plain.values())
    assert losses(tmp_path / "plain") == losses(out)
    # and the final weights
    import torch

    from simmim_fast.weights import load_model_state
    _, a = load_model_state(tmp_path / "plain")
    _, b = load_model_state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _last_step(out):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    return max((json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip().endswith("}")),
               default=0)


def test_kill_and_resume_with_the_probe_is_bit_identical(probed_run, tmp_path, capsys, one_thread):
    out, folder = probed_run
    cut = tmp_path / "cut"
    train = [sys.executable, str(ROOT / "train.py")] + BASE + probe_args(folder) + ["--output-dir", str(cut)]
    proc = subprocess.Popen(train, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while _last_step(cut) < 7 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _last_step(cut)
    saved = int((cut / "checkpoints/latest").read_text().strip()[len("step_"):])
    assert 6 <= saved <= killed_at < STEPS, "the run must be killed after a probed checkpoint and before the end"
    assert train_main(train[2:]) == 0   # --resume auto, in this process (one thread, as the reference)
    printed = capsys.readouterr().out
    assert f"resumed from {cut / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in printed
    # the progress line carries the probe's value, and its cost is printed
    last = f"step {STEPS}/{STEPS}"
    assert any(last in line and f"probe/knn_top1 {probes(out)[STEPS]:.4g}" in line for line in printed.splitlines())
    assert f"probe step {STEPS}: knn_top1 {probes(out)[STEPS]:.2f} (" in printed and "s per probe)" in printed
    assert losses(cut) == losses(out)     # bit-identical per-step losses
    assert probes(cut) == probes(out)     # and probe values


def test_bad_probe_data_is_one_error_line(tmp_path, capsys):
    rc = cli_main(["pretrain"] + BASE + ["--set", f"logging.probe.data={json.dumps(str(tmp_path / 'none'))}",
                                         "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "logging.probe.data" in err[0] and "train/ and val/" in err[0]
