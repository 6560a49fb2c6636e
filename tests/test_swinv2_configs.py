"""The shipped SwinV2 configs: B follows the official SimMIM SwinV2-B recipe, all four paper sizes
build (on the meta device: no memory), SwinV2-G has the paper's ~3.0B parameters, and the CPU-sized
tiny config trains."""
import sys

import pytest
import torch

from engine_subprocess import ROOT, requires_deepspeed, run
from simmim_fast import SimMIM, load_config

SIZES = {  # embed dim, depths, heads (SwinV2 paper, Table 1 / A1)
    "b": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "l": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
    "h": (352, [2, 2, 18, 2], [11, 22, 44, 88]),
    "g": (512, [2, 2, 42, 4], [16, 32, 64, 128]),
}


def _meta_model(cfg):
    with torch.device("meta"):
        return SimMIM.from_config(cfg)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_paper_configs_build(size):
    cfg = load_config(ROOT / f"configs/swinv2_{size}.json")
    m = cfg.model
    assert (m.encoder, m.embed_dim, m.depths, m.num_heads) == ("swinv2",) + SIZES[size]
    assert (m.img_size, m.window_size, m.patch_size) == (192, 12, 4)
    assert m.norm_targets and m.norm_targets_window == 47
    model = _meta_model(cfg)
    windows = [stage.blocks[0].window_size for stage in model.encoder.layers]
    assert windows == [(12, 12), (12, 12), (12, 12), (6, 6)]  # 48, 24, 12, 6 tokens per side
    assert model.encoder.num_features == 8 * m.embed_dim


def test_swinv2_b_is_the_official_recipe():
    # microsoft/Swin-Transformer configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml
    cfg = load_config(ROOT / "configs/swinv2_b.json")
    t = cfg.train
    assert cfg.model.drop_path_rate == 0.1
    assert (cfg.mask.mask_patch_size, cfg.mask.mask_ratio) == (32, 0.6)
    assert (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.weight_decay) == (800, 10, 1e-4, 5e-7, 0.05)
    assert (t.lr_scheduler, t.decay_epochs, t.decay_rate) == ("multistep", [700], 0.1)
    assert t.global_batch_size == 2048


def test_swinv2_g_has_3_billion_parameters():
    model = _meta_model(load_config(ROOT / "configs/swinv2_g.json"))
    n = sum(p.numel() for p in model.encoder.parameters())
    assert abs(n - 2_997.8e6) / 2_997.8e6 < 0.005, n
    h = sum(p.numel() for p in _meta_model(load_config(ROOT / "configs/swinv2_h.json")).encoder.parameters())
    assert abs(h - 658e6) / 658e6 < 0.01, h  # the SwinV2 paper's 658M


@requires_deepspeed
def test_tiny_swinv2_config_trains(tmp_path):
    from simmim_fast.engine.metrics import read_metrics
    out = tmp_path / "run"
    args = ["--config", "configs/swinv2_tiny_cpu.json", "--output-dir", str(out), "--set", "train.max_steps=30",
            "--set", "logging.visualize_every=0", "--set", "logging.tensorboard=false", "--set", "logging.print_every=5",
            "--set", "checkpoint.every_steps=30", "--set", "logging.loss_curve=false"]
    run([sys.executable, str(ROOT / "train.py")] + args, timeout=400)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 30 and all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
