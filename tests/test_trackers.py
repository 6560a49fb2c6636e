"""Experiment trackers, offline: W&B offline mode writes its run files locally, MLflow a local file store; each
is read back with the library's own reader and compared with metrics.jsonl (every scalar TensorBoard gets,
the probe's included), the resolved config and the reconstruction grids. A run stopped at step 2 and
resumed to step 4 continues the same tracker runs.
"""
import glob
import json
import struct

import pytest

from simmim_fast.cli import main as cli_main, train_main
from simmim_fast.engine.metrics import read_metrics, record_scalars

from engine_subprocess import one_thread  # noqa: F401
from probe_helpers import BASE, probe_args, write_probe_folder

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

DROP = ("train.max_steps=", "checkpoint.every_steps=", "logging.visualize_every=", "logging.print_every=")
ARGS = [x for flag, value in zip(BASE[::2], BASE[1::2]) if not value.startswith(DROP) for x in (flag, value)]
# print_every 2: step 1's record is still pending when step 2's image is made (W&B must get it after step 1)
ARGS += ["--set", "checkpoint.every_steps=2", "--set", "logging.visualize_every=2", "--set", "logging.print_every=2",
         "--set", "logging.wandb.enabled=true", "--set", "logging.wandb.mode=offline",
         "--set", "logging.wandb.project=simmim-test", "--set", "logging.mlflow.enabled=true"]


@pytest.fixture(autouse=True)
def quiet_offline_trackers(monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                 "WANDB_DISABLE_CODE": "true", "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_META": "true",
                 "WANDB_X_DISABLE_MACHINE_INFO": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(k, v)


def wandb_records(path):
    """The protobuf Records of an offline ``run-<id>.wandb`` file. wandb >= 0.2x writes it from its Go core and
    ships no Python reader any more; the file is a LevelDB log (7-byte header ':W&B', 0xBEE1, version; 32 KiB
    blocks of chunks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)), each record
    a serialised ``wandb.proto.wandb_internal_pb2.Record``, which is parsed with wandb's own class."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic)
    i, buf = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # block trailer: zero padding
            i += 32768 - i % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        buf += data[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_run(out):
    """(run ids, config, {step: {key: value}}) over every offline run directory of ``out`` (one per segment)."""
    ids, config, history = [], {}, {}
    for f in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.append(rec.run.run_id)
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                items = {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in rec.history.item}
                history.setdefault(int(items["_step"]), {}).update(items)
    return ids, config, history


def test_wandb_and_mlflow_get_what_tensorboard_gets_and_resume_the_same_runs(tmp_path, one_thread):
    from mlflow.tracking import MlflowClient
    folder = write_probe_folder(tmp_path / "probe_data")
    out = tmp_path / "run"
    uri = (tmp_path / "mlruns").as_uri()
    args = ARGS + probe_args(folder) + ["--set", f"logging.mlflow.tracking_uri={json.dumps(uri)}",
                                        "--output-dir", str(out)]
    assert train_main(args + ["--set", "train.max_steps=2"]) == 0
    first_ids = json.loads((out / "trackers.json").read_text())
    assert train_main(args + ["--set", "train.max_steps=4"]) == 0   # --resume auto from step 2
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == first_ids and set(ids) == {"wandb", "mlflow"}

    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    expected = {r["step"]: record_scalars(r) for r in recs}
    assert "probe/knn_top1" in expected[2] and "train/loss" in expected[1]
    resolved = json.loads((out / "config.json").read_text())

    # MLflow: the run's metric histories, params, config and images, read with MlflowClient.
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == resolved["name"]
    got = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(ids["mlflow"], key):
            got.setdefault(m.step, {})[key] = m.value
    assert got == expected
    assert json.loads(run.data.params["train.base_lr"]) == resolved["train"]["base_lr"]
    arts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert "config.json" in arts and "reconstructions" in arts
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "reconstructions")} == {
        "reconstructions/step_00000002.png", "reconstructions/step_00000004.png"}
    local = client.download_artifacts(ids["mlflow"], "config.json", str(tmp_path))
    assert json.loads(open(local).read()) == resolved

    # W&B: the offline run files of both segments: one run id, the config, every scalar, the images.
    run_ids, config, history = wandb_run(out)
    assert run_ids == [ids["wandb"]] * 2
    for section in ("model", "train", "logging"):
        assert config[section] == resolved[section]
    assert {s: {k: v for k, v in h.items() if not k.startswith(("_", "reconstructions"))}
            for s, h in history.items()} == expected
    for step in (2, 4):
        assert history[step]["reconstructions/_type"] == "image-file"
        media = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / history[step]["reconstructions/path"]))
        assert len(media) == 1


def test_a_missing_tracker_package_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    rc = cli_main(["pretrain"] + ARGS + ["--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "logging.mlflow.enabled" in err[0] and '.[mlflow]' in err[0], err
