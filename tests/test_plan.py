"""The memory planner (``simmim-fast plan``): its estimate against the peak measured on the CPU, the
JSON schema, every shipped config, batch arithmetic, train.py's fit decision and bad input."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm.layers.config
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch._subclasses.fake_tensor import FakeTensorMode

import simmim_fast.engine.run as engine_run
from simmim_fast.cli import main as cli_main, train_main
from simmim_fast.config import load_config
from simmim_fast.errors import UserError
from simmim_fast.models import SimMIM
from simmim_fast.tools import plan as P

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/swin_tiny_cpu.json")
FP32_TORCH = ['engine.precision="fp32"', 'engine.optimizer="torch_foreach"', 'engine.mode="torch"',
              "engine.zero_stage=0"]
VIT_SMALL = ["model.embed_dim=192", "model.depths=[4]", "model.num_heads=[3]"]

SWIN_T_WIDTH = ["model.embed_dim=96", "model.depths=[2,2,6,2]", "model.num_heads=[3,6,12,24]"]
# (config, micro batch, checkpointing, overrides): a Swin-T-sized model (model states dominate), a
# tiny Swin with every block checkpointed, a tiny Swin at a large batch of small images, a 4-block
# ViT. The widest gap seen is not among them (docs/ENGINE.md "Memory planner").
PEAK_CASES = [
    ("configs/swin_tiny_cpu.json", 8, False, SWIN_T_WIDTH),
    ("configs/swin_tiny_cpu.json", 32, True, []),
    ("configs/fmnist_swin_cpu.json", 128, False, []),
    ("configs/vit_b.json", 4, False, VIT_SMALL),
]


def _case_config(config, batch, overrides):
    return load_config(ROOT / config, overrides=overrides + FP32_TORCH + [f"train.micro_batch_size={batch}",
                                                                          f"train.global_batch_size={batch}"])


def _measure_in_a_fresh_process(config, batch, ckpt, overrides):
    """The worker in its own process: in this one, memory that earlier tests freed but the C allocator
    kept would be reused without the resident set rising, and the measured peak would be too low."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_peak_worker.py"),
                          json.dumps([[config, batch, ckpt, overrides]])],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_estimate_within_15_percent_of_the_peak_measured_on_the_cpu():
    report = []
    for config, batch, ckpt, overrides in PEAK_CASES:
        cfg = _case_config(config, batch, overrides)
        facts = P.model_facts(cfg)
        fit = P.activation_fit(cfg, ckpt, "fp32", False)
        # The CPU has no CUDA context and no caching allocator: compare the allocated bytes alone.
        est, _, _, _ = P.estimate(cfg, facts, fit, gpus=1, gpus_per_host=1, zero_stage=0, offload="none",
                                  micro_batch=batch, allowances=P.Allowances(0.0, 0.0, 0.0))
        m = _measure_in_a_fresh_process(str(ROOT / config), batch, ckpt, overrides + FP32_TORCH + [
            f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}"])
        assert facts.params == m["params"]
        report.append((config, batch, ckpt, round(est / 2 ** 20, 1), round(m["peak_bytes"] / 2 ** 20, 1)))
    print("estimate vs measured MiB:", report)  # shown with pytest -s
    for config, batch, ckpt, est, meas in report:
        assert 0.85 <= est / meas <= 1.15, report


def test_json_schema(capsys):
    code = cli_main(["plan", "--config", TINY, "--gpus", "2", "--gpu-memory-gb", "80", "--cpu-memory-gb", "64",
                     "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert isinstance(out["model_params"], int) and out["model_params"] > 0
    choices = out["choices"]
    assert len(choices) == 16  # stage 0: none; 1, 2: none, optimizer; 3: three offloads; x checkpointing off/on
    assert {(c["zero_stage"], c["offload"]) for c in choices} == {
        (0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
        (3, "none"), (3, "optimizer"), (3, "optimizer_and_params")}
    for c in choices:
        assert isinstance(c["zero_stage"], int) and c["offload"] in P.OFFLOADS
        assert isinstance(c["activation_checkpointing"], bool) and isinstance(c["micro_batch"], int)
        assert isinstance(c["per_gpu_gb"], float) and isinstance(c["per_host_gb"], float)
        assert c["fits"] == (c["per_gpu_gb"] <= 80 and c["per_host_gb"] <= 64 and c["accumulation_steps"] is not None)
    rec = out["recommended"]
    assert rec["fits"] and rec["micro_batch"] * rec["accumulation_steps"] * 2 == 16
    assert {k: v for k, v in rec.items() if k != "set"} in choices
    # plenty of memory: the fastest choice by the stated rule, at the config's micro batch
    chosen = (rec["zero_stage"], rec["offload"], rec["activation_checkpointing"], rec["micro_batch"])
    assert chosen == (0, "none", False, 8)
    assert "engine.zero_stage=0" in rec["set"]


def test_tight_memory_picks_the_fastest_fitting_choice():
    cfg = load_config(TINY, overrides=["train.micro_batch_size=8"])
    roomy = P.plan(cfg, 1, 1000.0)
    by = {(c.zero_stage, c.offload, c.activation_checkpointing): c for c in roomy.choices}
    # between the no-checkpointing ZeRO-0 peak and the checkpointed one: micro batch or checkpointing must give
    limit = (by[(0, "none", False)].per_gpu_gb + by[(0, "none", True)].per_gpu_gb) / 2
    tight = P.plan(cfg, 1, limit)
    rec = tight.recommended
    assert rec is not None and rec.per_gpu_gb <= limit
    fitting = [c for c in tight.choices if c.fits]
    key = lambda c: (P.speed_rank(c.zero_stage, c.offload, c.activation_checkpointing), -c.micro_batch)  # noqa: E731
    assert rec is min(fitting, key=key)
    for c in tight.choices:  # each choice at its largest fitting micro batch: twice it would not fit
        if c.fits and c.micro_batch < 8:
            bigger = P.plan(load_config(TINY, overrides=[f"train.micro_batch_size={c.micro_batch * 2}"]), 1, limit,
                            choices=[(c.zero_stage, c.offload, c.activation_checkpointing)]).choices[0]
            assert bigger.micro_batch == c.micro_batch or not bigger.fits
    nothing = P.plan(cfg, 1, 0.5)  # below the 1 GB reserved allowance
    assert nothing.recommended is None and "no choice fits" in nothing.problem


def test_a_torch_mode_config_is_told_to_switch_to_deepspeed_for_zero3():
    cfg = load_config(TINY, overrides=['engine.mode="torch"', "engine.zero_stage=0"])
    p = P.plan(cfg, 2, 80.0, choices=[(3, "optimizer_and_params", False)])
    assert p.to_json()["recommended"]["set"][0] == 'engine.mode="deepspeed"'
    assert 'engine.mode="deepspeed"' not in P.plan(cfg, 2, 80.0, choices=[(0, "none", False)]).to_json()[
        "recommended"]["set"]


def test_accumulation_steps_and_a_global_batch_that_does_not_divide():
    cfg = load_config(TINY)  # global batch 16, micro batch 8
    p4 = P.plan(cfg, 4, 80.0, choices=[(0, "none", False)])
    assert (p4.recommended.micro_batch, p4.recommended.accumulation_steps) == (4, 1)
    p3 = P.plan(cfg, 3, 80.0, choices=[(0, "none", False)])
    assert p3.recommended is None and "not a multiple of 3 GPUs" in p3.problem
    assert p3.choices[0].accumulation_steps is None and not p3.choices[0].fits


def test_checkpointing_measures_less_activation_memory():
    for overrides in ([], VIT_SMALL):
        cfg = load_config(ROOT / ("configs/vit_b.json" if overrides else "configs/swin_tiny_cpu.json"),
                          overrides=overrides)
        plain = P.activation_fit(cfg, False, "bf16", False)
        ckpt = P.activation_fit(cfg, True, "bf16", False)
        fp32 = P.activation_fit(cfg, False, "fp32", False)
        assert 0 < ckpt.act_per_image < 0.7 * plain.act_per_image
        assert plain.act_per_image < fp32.act_per_image  # autocast's bf16 copies are half the size


def test_checkpointing_every_second_block_measures_between_off_and_every_block():
    cfg = load_config(ROOT / "configs/vit_b.json", overrides=VIT_SMALL)
    off, every, second = (P.activation_fit(cfg, c, "bf16", False).act_per_image for c in (False, True, 2))
    assert every < second < off
    with pytest.raises(UserError, match="block interval"):
        P.activation_fit(cfg, -1, "bf16", False)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.json")))
def test_every_shipped_config_plans(config):
    cfg = load_config(ROOT / "configs" / config)
    p = P.plan(cfg, 8, 80.0, choices=[(0, "none", False), (3, "optimizer_and_params", False)])
    assert p.model_params > 0 and len(p.choices) == 2
    assert all(c.per_gpu_gb > 0 and c.per_host_gb > 0 for c in p.choices)
    assert p.choices[1].gpu_breakdown_gb["optimizer_states"] == 0.0


def test_the_fit_decision_train_py_makes(monkeypatch):
    cfg = load_config(TINY)  # deepspeed, ZeRO-1, micro batch 8
    ok = P.check_fits(cfg, world_size=1, gpu_memory_gb=80.0)
    assert ok.fits and ok.zero_stage == 1 and ok.micro_batch == 8
    own = ok.per_gpu_gb
    with pytest.raises(UserError) as e:
        P.check_fits(cfg, world_size=1, gpu_memory_gb=own - 0.01)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit on 1 GPU" in msg and "--set " in msg
    with pytest.raises(UserError, match="cannot fit on 1 GPU"):
        P.check_fits(cfg, world_size=1, gpu_memory_gb=0.5)
    assert P.preflight_memory(cfg) is None or torch.cuda.is_available()  # nothing on the CPU


def test_cli_bad_input_exits_2(capsys, tmp_path):
    base = ["plan", "--config", TINY]
    for argv, phrase in [(base + ["--gpus", "0", "--gpu-memory-gb", "80"], "--gpus"),
                         (base + ["--gpus", "1", "--gpu-memory-gb", "-1"], "--gpu-memory-gb"),
                         (base + ["--gpus", "1", "--gpu-memory-gb", "80", "--cpu-memory-gb", "0"], "--cpu-memory-gb"),
                         (base + ["--gpus", "1", "--gpu-memory-gb", "80", "--set", "model.nope=1"], "model.nope"),
                         (["plan", "--config", str(tmp_path / "none.json"), "--gpus", "1", "--gpu-memory-gb", "8"],
                          "not found")]:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and phrase in err, err


def test_human_table(capsys):
    assert cli_main(["plan", "--config", TINY, "--gpus", "1", "--gpu-memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "| ZeRO | offload | checkpointing |" in out and "recommended" in out and "--set engine.zero_stage=" in out


def test_meta_measurement_equals_the_same_counter_on_real_cpu_tensors():
    cfg = load_config(TINY, overrides=['engine.precision="fp32"'])
    meta = P.measure_activations(cfg, 4, False, "fp32", False)
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    counter = P._LiveBytes()
    counter.ignore(list(model.parameters()) + list(model.buffers()))
    hooks = [p.register_post_accumulate_grad_hook(counter.mark_grad) for p in model.parameters()]
    m = cfg.model
    tokens = m.img_size // m.patch_size
    with counter:
        images = torch.randn(4, 3, m.img_size, m.img_size)
        mask = (torch.rand(4, tokens, tokens) < 0.6).to(torch.uint8)
        model(images, mask).backward()
    for h in hooks:
        h.remove()
    assert meta == (counter.peak_act, counter.peak_act_grads)
    assert counter.grad == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("case", ["swin", "vit", "timm_swinv2"])
def test_autocast_emulation_saves_what_cuda_autocast_saves(case, monkeypatch):
    """Forward only: fake CUDA tensors run CUDA autocast's real cast policy (switched on directly, as
    torch.autocast refuses without a GPU); the autograd engine would need a device for the backward.
    timm's fused attention is off in both (its kernel choice needs a real GPU). SwinV2 (scaled cosine
    attention: F.normalize, logit scale, the cpb MLP) as timm's encoder alone."""
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    if case == "timm_swinv2":
        size = 96

        def build():
            with torch.device("meta"):
                return SwinTransformerV2(img_size=size, window_size=6, embed_dim=32, depths=(1, 1, 2, 1),
                                         num_heads=(1, 2, 4, 8), num_classes=0, drop_path_rate=0.1).train()

        def inputs(device):
            return (torch.empty(2, 3, size, size, device=device),)
    else:
        config, overrides = (("configs/vit_b.json", VIT_SMALL) if case == "vit" else
                             (TINY, ["model.norm_targets=true", "model.drop_path_rate=0.1"]))
        m = dataclasses.replace(load_config(ROOT / config, overrides=overrides).model, ops_backend="torch")
        tokens = m.img_size // m.patch_size

        def build():  # not P._meta_model: its cache may hold a model built with fused attention
            with torch.device("meta"):
                return SimMIM.from_config(m).train()

        def inputs(device):
            return (torch.empty(2, m.in_chans, m.img_size, m.img_size, device=device),
                    torch.empty(2, tokens, tokens, dtype=torch.uint8, device=device))

    def saved_by(forward):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            forward()
        return sorted(saved, key=str)

    emulated_net, cuda_net = build(), build()
    with P._CudaAutocastOnMeta(torch.bfloat16):
        emulated = saved_by(lambda: emulated_net(*inputs("meta")))
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda_net = cuda_net.to_empty(device="cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            real = saved_by(lambda: cuda_net(*inputs("cuda")))
        finally:
            torch.set_autocast_enabled("cuda", False)
            torch.clear_autocast_cache()
    assert emulated == real
    assert {d for _, d in real} >= {torch.bfloat16, torch.float32}


def test_train_py_refuses_a_config_that_cannot_fit_before_the_engine_starts(monkeypatch, capsys, tmp_path):
    """The preflight wiring, with CUDA faked: a 0.5 GB GPU (below the reserved allowance) is refused in
    one line; an 80 GB one passes the check."""
    gpu = SimpleNamespace(total_memory=2 ** 29)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    monkeypatch.setattr(engine_run, "run", lambda *a, **k: pytest.fail("the engine started"))
    assert train_main(["--config", TINY, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this config cannot fit on 1 GPU(s)") and err.count("\n") == 1, err
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * 2 ** 30))
    assert P.preflight_memory(load_config(TINY)).fits
