"""train.py options and the errors promised for bad input, all raised before the engine starts;
the DeepSpeed config derived from ours."""
import json

from engine_subprocess import ROOT
from simmim_fast import load_config
from simmim_fast.engine.ds_config import deepspeed_config, resolve_precision, uses_autocast
from simmim_fast.cli import train_main as cli

TINY = str(ROOT / "configs/swin_tiny_cpu.json")


def _fails(capsys, args, phrase):
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err, err
    return err


def test_bad_config_and_overrides(capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "o")]
    _fails(capsys, ["--config", str(tmp_path / "missing.json")] + out, "config file not found")
    _fails(capsys, ["--config", TINY, "--set", "train.nope=1"] + out, "unknown config key 'train.nope'")
    _fails(capsys, ["--config", TINY, "--set", "engine.zero_stage=5"] + out, "'engine.zero_stage'")
    _fails(capsys, ["--config", TINY, "--set", "train.base_lr"] + out, "section.key=value")
    _fails(capsys, ["--config", TINY, "--set", "engine.deepspeed={\"train_batch_size\": 8}"] + out,
           "'engine.deepspeed.train_batch_size'")
    _fails(capsys, ["--config", TINY, "--set", "engine.precision=fp16"] + out, "needs CUDA")
    _fails(capsys, ["--config", TINY, "--set", "train.nan_policy=skip", "--set", "engine.zero_stage=0"] + out,
           "'train.nan_policy'")
    _fails(capsys, ["--config", TINY, "--set", "engine.bf16_weights=true", "--set", "engine.mode=torch"] + out,
           "'engine.bf16_weights'")


def test_world_size_must_divide_the_batch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    _fails(capsys, ["--config", TINY, "--output-dir", str(tmp_path)], "world size (3)")


def test_missing_and_empty_data(capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "o")]
    _fails(capsys, ["--config", TINY, "--data-path", str(tmp_path / "nope")] + out, "data.path does not exist")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--config", TINY, "--data-path", str(tmp_path / "empty")] + out, "no images found")
    _fails(capsys, ["--config", TINY, "--set", "train.micro_batch_size=64", "--set", "train.global_batch_size=64"]
           + out, "fewer than one optimiser step")


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a path under a file cannot be created, even by root
    _fails(capsys, ["--config", TINY, "--output-dir", str(blocker / "run")], "is not writable")


def test_bad_resume(capsys, tmp_path):
    _fails(capsys, ["--config", TINY, "--output-dir", str(tmp_path / "o"), "--resume", str(tmp_path / "nope")],
           "does not exist")
    ck = tmp_path / "o2" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "latest").write_text("step_00000005\n")
    _fails(capsys, ["--config", TINY, "--output-dir", str(tmp_path / "o2"), "--resume", "auto"],
           "not a complete checkpoint")
    _fails(capsys, ["--config", TINY, "--output-dir", str(tmp_path / "o2"), "--resume", "none"],
           "already holds checkpoints")
    # a complete checkpoint of another model: refused before anything starts, naming the key
    from simmim_fast.engine.checkpoint import CheckpointManager
    def payload(d):  # the files a torch-mode backend writes
        (d / "model.pt").write_bytes(b"")
        (d / "optimizer.pt").write_bytes(b"")
    CheckpointManager(tmp_path / "o3", 0, 2, lambda: None).save(
        5, load_config(TINY, overrides=["model.embed_dim=48"]), {"state": {"step": 5}}, payload)
    _fails(capsys, ["--config", TINY, "--output-dir", str(tmp_path / "o3")], "model.embed_dim: checkpoint 48, now 32")


def test_deepspeed_config_is_derived():
    cfg = load_config(ROOT / "configs/swin_l.json", overrides=[
        "engine.zero_stage=2", "engine.deepspeed={\"zero_optimization\": {\"reduce_bucket_size\": 123}, "
        "\"gradient_clipping\": 1.0}"])
    ds = deepspeed_config(cfg, world_size=8, precision="bf16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        2048, 128, 2)
    assert ds["gradient_clipping"] == 1.0                         # user override wins
    z = ds["zero_optimization"]
    assert z["stage"] == 2 and z["reduce_bucket_size"] == 123 and z["overlap_comm"] is True
    assert z["contiguous_gradients"] is True and "optimizer" not in ds and "scheduler" not in ds
    assert ds["bf16"]["enabled"] is False and uses_autocast("bf16")  # fp32 weights + autocast by default
    one = deepspeed_config(cfg, world_size=1, precision="bf16")
    assert one["zero_optimization"]["overlap_comm"] is False and one["gradient_accumulation_steps"] == 16
    w = load_config(ROOT / "configs/swin_l.json", overrides=["engine.bf16_weights=true", "engine.zero_stage=1"])
    dsw = deepspeed_config(w, world_size=16, precision="bf16")
    assert dsw["bf16"]["enabled"] is True and dsw["data_types"]["grad_accum_dtype"] == "fp32"
    assert uses_autocast("bf16") and not uses_autocast("fp32")
    assert dsw["gradient_clipping"] == 5.0 and json.dumps(dsw)
    assert resolve_precision(cfg, "cpu") == "bf16" and resolve_precision(load_config(None), "cpu") == "fp32"
    assert resolve_precision(load_config(None), "cuda") == "bf16"
