"""ZeRO-Offload (engine.offload) and activation checkpointing through DeepSpeed on two gloo ranks: the
same losses as ZeRO-1, bit-exact resume, consolidation; the derived DeepSpeed config and the refused
combinations."""
import json
import sys

import pytest
import torch

from engine_subprocess import ROOT, deepspeed_launcher, requires_deepspeed, run
from simmim_fast import load_config
from simmim_fast.cli import train_main
from simmim_fast.config import ConfigError
from simmim_fast.engine.ds_config import deepspeed_config, offload_config

VARIANTS = ["1", "0c", "1c", "2c", "3c", "3o", "3p"]  # c = checkpointing, o = optimizer offload, p = + params


def _cfg(**engine):
    return load_config({"engine": dict({"mode": "deepspeed"}, **engine),
                        "train": {"global_batch_size": 8, "micro_batch_size": 4}})


def test_derived_deepspeed_config():
    zero = deepspeed_config(_cfg(zero_stage=3, offload="optimizer"), 2, "bf16")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    zero = deepspeed_config(_cfg(zero_stage=3, offload="optimizer_and_params"), 2, "bf16")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    nvme = _cfg(zero_stage=3, offload="optimizer_and_params", offload_device="nvme", nvme_path="/nvme/x")
    assert offload_config(nvme, pin_memory=True) == {
        "offload_optimizer": {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme/x"},
        "offload_param": {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme/x"}}
    zero = deepspeed_config(_cfg(zero_stage=2, offload="optimizer"), 2, "bf16")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in deepspeed_config(_cfg(zero_stage=3), 2, "bf16")["zero_optimization"]


@pytest.mark.parametrize("engine, key, phrase", [
    (dict(zero_stage=2, offload="optimizer_and_params"), "engine.offload", "needs engine.zero_stage 3"),
    (dict(mode="torch", zero_stage=1, offload="optimizer"), "engine.offload", "needs engine.mode 'deepspeed'"),
    (dict(zero_stage=0, offload="optimizer"), "engine.offload", "zero_stage >= 1"),
    (dict(zero_stage=2, offload="optimizer", offload_device="nvme", nvme_path="/x"), "engine.offload_device",
     "needs engine.zero_stage 3"),
    (dict(zero_stage=3, offload="optimizer", offload_device="nvme"), "engine.nvme_path", "must name a folder"),
    (dict(zero_stage=3, offload="optimizer", optimizer="torch_fused"), "engine.optimizer", "CPU Adam"),
    (dict(zero_stage=3, optimizer="deepspeed_cpu"), "engine.optimizer", "needs engine.offload"),
])
def test_invalid_combinations_are_refused(engine, key, phrase):
    with pytest.raises(ConfigError) as e:
        _cfg(**engine)
    assert f"'{key}'" in str(e.value) and phrase in str(e.value), str(e.value)


def test_train_py_refuses_in_one_line(capsys, tmp_path):
    args = ["--config", str(ROOT / "configs/swinv2_tiny_cpu.json"), "--output-dir", str(tmp_path),
            "--set", "engine.offload=optimizer_and_params", "--set", "engine.zero_stage=1"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "engine.offload" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    worker = [str(ROOT / "tests/engine_offload_worker.py"), "--out", str(d), "--variants"] + VARIANTS
    # DeepSpeed JIT-builds its cpu_adam op on first use (minutes on a cold 2-core machine, then cached in
    # TORCH_EXTENSIONS_DIR): build it first under its own time limit, so the run's limit measures the run.
    run([sys.executable, "-c", "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"],
        timeout=1800)
    run(deepspeed_launcher() + ["--num_gpus", "2"] + worker, timeout=600)
    return d, json.loads((d / "result_rank0.json").read_text())


@requires_deepspeed
def test_offload_and_checkpointing_give_the_zero1_losses(result):
    _, res = result
    assert res["world_size"] == 2
    v = res["variants"]
    base = v["1"]["losses"]
    assert all(b < a for a, b in zip(base, base[1:]))
    for name in VARIANTS[1:]:
        assert v[name]["losses"] == pytest.approx(base, rel=1e-5, abs=0), name
    for name in ("3o", "3p"):
        assert v[name]["optimizer"] == "DeepSpeedCPUAdam" and v[name]["offload"] == "cpu", name
    assert v["3p"]["offload_param"] == "cpu" and v["3o"]["offload_param"] is None
    assert v["1"]["optimizer"] == "AdamW" and v["1"]["offload"] is None


@requires_deepspeed
def test_resume_is_bit_exact(result):
    _, res = result
    for name, v in res["variants"].items():
        assert v["resumed_losses"] == v["losses"][2:], name  # floats from JSON: bit-exact equality


@requires_deepspeed
def test_offloaded_checkpoints_consolidate(result):
    from simmim_fast.weights import load_model_state
    d, _ = result
    for name in ("3o", "3p", "3c"):
        cfg, state = load_model_state(d / f"v{name}")
        assert cfg.engine.offload == {"3o": "optimizer", "3p": "optimizer_and_params", "3c": "none"}[name]
        expected = torch.load(d / f"v{name}_params.pt")
        assert expected.keys() <= state.keys()
        for k, value in expected.items():
            assert torch.equal(state[k], value), (name, k)
