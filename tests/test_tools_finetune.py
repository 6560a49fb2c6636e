"""finetune: classifier init from SimMIM weights, loader, losses, evaluation, best-keeping;
layer-wise lr decay of the engine's param groups against the paper's formula."""
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from simmim_fast import SimMIM, load_config
from simmim_fast.jobs.finetune import (BestKeeper, FinetuneLoader, FinetuneModel, build_classifier, build_mixup,
                                        evaluate_top1)

from helpers import tiny_swin_config, tiny_vit_config


def _ft_cfg(make, **finetune):
    cfg = make(drop_path_rate=0.1)
    return load_config(cfg, overrides=[f"finetune.{k}={json.dumps(v)}" for k, v in finetune.items()])


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
def test_classifier_starts_from_the_pretrained_encoder(make):
    pre = make()
    torch.manual_seed(0)
    state = SimMIM.from_config(pre).state_dict()
    net, (name, kwargs) = build_classifier(_ft_cfg(make), 7, (pre, state))
    assert kwargs["drop_path_rate"] == 0.1 and net.num_classes == 7
    sd = net.state_dict()
    compared = 0
    for k, v in state.items():
        k = k[len("encoder."):] if k.startswith("encoder.") else None
        if k is None or "relative_position" in k or k.startswith("norm.") and "fc_norm.weight" in sd:
            continue
        assert torch.equal(sd[k], v), k
        compared += 1
    assert compared > 10
    torch.manual_seed(1)
    fresh, _ = build_classifier(_ft_cfg(make), 7, None)
    assert not torch.equal(fresh.state_dict()["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])


def test_losses_hard_and_soft_targets():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    logits = net(x)
    logp = logits.log_softmax(1)
    expected = (0.9 * -logp.gather(1, y[:, None])[:, 0] + 0.1 * -logp.mean(1)).mean()
    torch.testing.assert_close(FinetuneModel(net, 0.1, soft_targets=False)(x, y), expected)
    soft = torch.softmax(torch.randn(5, 3), 1)
    torch.testing.assert_close(FinetuneModel(net, 0.1, soft_targets=True)(x, soft), (-soft * logp).sum(1).mean())


def _toy_dataset(n=24):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 4)


def test_loader_is_resumable_and_mixup_is_seeded():
    cfg = _ft_cfg(tiny_swin_config)
    mixup = build_mixup(cfg, 4)
    loader = FinetuneLoader(_toy_dataset(), 4, seed=3, rank=0, world_size=1, device="cpu", num_workers=0, mixup=mixup)
    assert loader.micro_batches_per_epoch == 6
    np.random.seed(123)
    a = list(loader.epoch(2))
    after = np.random.rand()
    np.random.seed(123)
    assert np.random.rand() == after, "the global numpy stream must be left as it was"
    b = list(loader.epoch(2, start_batch=4))
    for (xa, ya), (xb, yb) in zip(a[4:], b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], list(loader.epoch(3))[0][0])
    x, y = a[0]
    assert y.shape == (4, 4) and torch.allclose(y.sum(1), torch.ones(4))
    assert y.min() >= 0.1 / 4 - 1e-6   # label smoothing folded into the soft targets
    plain = FinetuneLoader(_toy_dataset(), 4, 3, 0, 1, "cpu", 0, None)
    assert list(plain.epoch(0))[0][1].dtype == torch.int64
    assert build_mixup(_ft_cfg(tiny_swin_config, mixup=0.0, cutmix=0.0), 4) is None
    with pytest.raises(ValueError, match="even"):
        FinetuneLoader(_toy_dataset(), 3, 3, 0, 1, "cpu", 0, mixup)


def test_evaluate_top1_and_best_keeper(tmp_path):
    ds = TensorDataset(torch.eye(4).repeat(3, 1), torch.tensor([0, 1, 2, 3] * 3))
    net = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(4)[[0, 1, 3, 2]])   # classes 2 and 3 swapped: 50 %
    assert evaluate_top1(net, ds, 5, "cpu") == (50.0, 12)
    keeper = BestKeeper(tmp_path, "swin_tiny_patch4_window7_224", {"embed_dim": 16}, 4)
    assert keeper.update(50.0, 10, 0, net.state_dict)
    assert not keeper.update(40.0, 20, 1, lambda: pytest.fail("must not save a worse model"))
    assert json.loads((tmp_path / "best/metrics.json").read_text())["top1"] == 50.0
    assert torch.equal(load_file(str(tmp_path / "best/model.safetensors"))["weight"], net.weight)
    assert BestKeeper(tmp_path, "x", {}, 4).best == 50.0   # read back on resume


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay: the engine's param groups against the paper's rule, written out here independently.

def _spec_layer_id(name, encoder, depths):
    """The official SimMIM fine-tuning layer ids (get_swin_layer / get_vit_layer) on timm names:
    0 = patch embed / cls token / mask token; blocks 1..L in order; L + 1 = everything after.
    timm runs Swin's patch merging at the start of stage s (the official code at the end of stage
    s - 1, where it takes that stage's last block id)."""
    n = name[len("encoder."):] if name.startswith("encoder.") else name
    L = sum(depths)
    if n.startswith("patch_embed") or n in ("cls_token", "mask_token", "pos_embed", "absolute_pos_embed"):
        return 0
    if encoder == "swin":
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", n)
        if m:
            return sum(depths[:int(m.group(1))]) + int(m.group(2)) + 1
        m = re.match(r"layers\.(\d+)\.downsample\.", n)
        if m:
            return sum(depths[:int(m.group(1))])
        return L + 1
    m = re.match(r"blocks\.(\d+)\.", n)
    return int(m.group(1)) + 1 if m else L + 1


@pytest.mark.parametrize("config,decay,classes", [("configs/swin_b.json", 0.9, 1000), ("configs/swin_b.json", 0.8, 10),
                                                  ("configs/vit_b.json", 0.65, 1000)])
def test_layer_decay_lr_scales_match_the_spec(config, decay, classes):
    optim = pytest.importorskip("simmim_fast.engine.optim", reason="the training engine (simmim_fast.engine) is "
                                                                    "not merged into this tree yet")
    cfg = load_config(config, overrides=[f"train.layer_decay={decay}"])
    if cfg.model.encoder == "swin":
        cfg = load_config(cfg, overrides=["model.img_size=224", "model.window_size=7"])
    with torch.device("meta"):
        net, _ = build_classifier(cfg, classes, None)
    model = FinetuneModel(net, 0.1, soft_targets=True)
    groups = optim.param_groups(model, 0.05, layer_decay=decay, model_cfg=cfg.model)
    L = sum(cfg.model.depths)
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in groups:
        for p in g["params"]:
            name = by_id[id(p)]
            expected = decay ** (L + 1 - _spec_layer_id(name, cfg.model.encoder, cfg.model.depths))
            assert math.isclose(g["lr_scale"], expected, rel_tol=1e-12), (name, g["lr_scale"], expected)
            no_decay = p.ndim <= 1 or name.endswith(".bias") or "relative_position_bias_table" in name \
                or name.endswith(("cls_token", "absolute_pos_embed", "pos_embed"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(by_id)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and math.isclose(min(scales), decay ** (L + 1))   # head 1, patch embed decay^(L+1)
    head = [g["lr_scale"] for g in groups for p in g["params"] if by_id[id(p)].startswith("encoder.head.")]
    assert head and set(head) == {1.0}


def _run_finetune(tmp_path, name, *overrides):
    # A process per run: DeepSpeed keeps process-group state that a second engine in one process trips on.
    import os
    import subprocess
    import sys
    sets = ["finetune.train_limit=256", "finetune.val_limit=64", "train.epochs=1", "train.warmup_epochs=0",
            "logging.tensorboard=false", *overrides]
    cmd = [sys.executable, "-m", "simmim_fast.cli", "finetune", "none", "--config", "configs/finetune_fmnist_cpu.json",
           "--output-dir", str(tmp_path / name), "--workers", "0"] + [a for s in sets for a in ("--set", s)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / name / "best/metrics.json").read_text())


def test_zero3_keeps_the_same_best_weights_as_zero1(tmp_path):
    pytest.importorskip("simmim_fast.engine.backends", reason="the training engine is not in this tree")
    pytest.importorskip("deepspeed")
    from simmim_fast.tools.fashion_mnist import fashion_mnist_root
    if not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
    r1 = _run_finetune(tmp_path, "z1", "engine.mode=deepspeed", "engine.zero_stage=1")
    r3 = _run_finetune(tmp_path, "z3", "engine.mode=deepspeed", "engine.zero_stage=3")
    assert r1["top1"] == r3["top1"] and r1["step"] == r3["step"]
    a, b = load_file(str(tmp_path / "z1/best/model.safetensors")), load_file(str(tmp_path / "z3/best/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:   # ZeRO-3 partitions parameters: best/ must hold the gathered, full tensors
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-4), k
