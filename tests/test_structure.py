"""The architecture holds: what each layer may import, and the one front door's shared options."""
import subprocess
import sys
from pathlib import Path

import pytest

from simmim_fast.cli import COMMANDS, command_parser, main as cli_main
from simmim_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _imported_after(module: str) -> list:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print('\\n'.join(sorted(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return run.stdout.split()


def test_kernels_import_nothing_of_simmim_fast_timm_deepspeed_dali():
    mods = _imported_after("simmim_kernels") + _imported_after("simmim_kernels.reference")
    bad = sorted({m for m in mods if m.split(".")[0] in ("simmim_fast", "timm", "deepspeed")
                  or m.startswith("nvidia.dali")})
    assert not bad, bad


def test_reexported_kernels_stay_light():
    mods = _imported_after("simmim_fast.kernels")
    assert not [m for m in mods if m.split(".")[0] in ("timm", "deepspeed") or m.startswith("nvidia.dali")]


@pytest.mark.parametrize("module", ["simmim_fast.engine", "simmim_fast.engine.run", "simmim_fast.engine.trainer",
                                    "simmim_fast.engine.backends", "simmim_fast.engine.checkpoint"])
def test_engine_knows_no_simmim(module):
    mods = _imported_after(module)
    bad = [m for m in mods if m.startswith(("simmim_fast.models", "simmim_fast.data", "simmim_fast.tools",
                                            "simmim_fast.jobs", "simmim_fast.weights"))]
    assert not bad, bad


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_every_job_accepts_the_shared_options(name):
    parser, _ = command_parser(name)
    extra = ["none"] if name == "finetune" else []
    args = parser.parse_args(extra + ["--config", "c.json", "--set", "a.b=1", "--set", "c.d=2",
                                      "--output-dir", "o", "--resume", "none"])
    assert (args.config, args.overrides, args.output_dir, args.resume) == ("c.json", ["a.b=1", "c.d=2"], "o", "none")


@pytest.mark.parametrize("name", ["export", "visualize", "knn", "linear-probe", "scan"])
def test_every_tool_takes_config_and_set_the_same_way(name):
    parser, _ = command_parser(name)
    extra = {"scan": [], "export": ["ckpt", "-o", "x"]}.get(name, ["ckpt"])
    args = parser.parse_args(extra + ["--config", "c.json", "--set", "a.b=1"])
    assert (args.config, args.overrides) == ("c.json", ["a.b=1"])


def test_every_command_is_registered_with_a_module():
    for name in COMMANDS:
        parser, module = command_parser(name)
        assert callable(module.main)


def _finetune_args(tmp_path, resume="auto"):
    return ["finetune", "none", "--config", str(ROOT / "configs/finetune_fmnist_cpu.json"),
            "--output-dir", str(tmp_path / "ft"), "--resume", resume]


def _fake_checkpoint(out: Path, cfg) -> None:
    import json

    from simmim_fast.config import config_to_dict
    ckpt = out / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    (ckpt / "trainer_state.json").write_text(json.dumps({"state": {"step": 1}}))
    for name in ("model.pt", "optimizer.pt", "rng/rank_00000.pt"):  # the files a torch-mode checkpoint holds
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(b"")
    (out / "checkpoints" / "latest").write_text("step_00000001\n")


def test_finetune_refuses_resume_none_into_a_dir_with_checkpoints(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "ft", load_config(ROOT / "configs/finetune_fmnist_cpu.json"))
    assert cli_main(_finetune_args(tmp_path, "none")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume none") and "already holds checkpoints" in err


def test_finetune_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    other = load_config(ROOT / "configs/finetune_fmnist_cpu.json", ["model.embed_dim=48"])
    _fake_checkpoint(tmp_path / "ft", other)
    assert cli_main(_finetune_args(tmp_path, "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the warning that it carries no manifest
    assert err.startswith("error: cannot resume from") and "model.embed_dim" in err


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint not found")
