"""Param groups: the official no-decay rules and layer-wise lr decay ids for Swin and ViT."""
import pytest
import torch

from helpers import tiny_swin_config, tiny_vit_config
from simmim_fast import SimMIM
from simmim_fast.engine.optim import build_adamw, layer_id, layer_scale, param_groups


def _by_name(model, groups):
    ids = {id(p): g for g in groups for p in g["params"]}
    return {n: ids[id(p)] for n, p in model.named_parameters()}


def test_no_decay_rules_swin():
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    groups = param_groups(model, weight_decay=0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each param once
    g = _by_name(model, groups)
    no_decay = {n for n, grp in g.items() if grp["weight_decay"] == 0.0}
    assert "mask_token" in no_decay
    assert "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "encoder.layers.0.blocks.0.norm1.weight" in no_decay
    assert "encoder.layers.0.blocks.0.attn.qkv.bias" in no_decay
    assert "head.0.bias" in no_decay
    decay = {n for n, grp in g.items() if grp["weight_decay"] == 0.05}
    assert {"encoder.layers.0.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "head.0.weight",
            "encoder.layers.1.downsample.reduction.weight"} <= decay
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in decay)
    # the relative-position-bias rule holds without the model's own list (e.g. a fine-tuning classifier)
    bare = _by_name(model, param_groups(model, weight_decay=0.05, no_decay_names=()))
    assert bare["encoder.layers.0.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.0


def test_no_decay_rules_vit():
    model = SimMIM.from_config(tiny_vit_config())
    g = _by_name(model, param_groups(model, weight_decay=0.05))
    for n in ("mask_token", "encoder.cls_token", "encoder.rel_pos_bias.relative_position_bias_table",
              "encoder.blocks.0.gamma_1"):
        assert g[n]["weight_decay"] == 0.0, n
    assert g["encoder.blocks.1.mlp.fc1.weight"]["weight_decay"] == 0.05


def test_layer_ids_swin():
    cfg = tiny_swin_config(depths=[2, 2, 3, 2], num_heads=[1, 2, 2, 4]).model
    L = 9
    assert layer_id("mask_token", cfg) == 0
    assert layer_id("encoder.patch_embed.proj.weight", cfg) == 0
    assert layer_id("patch_embed.norm.weight", cfg) == 0                  # bare timm names too
    assert layer_id("encoder.layers.0.blocks.0.attn.qkv.weight", cfg) == 1
    assert layer_id("encoder.layers.0.blocks.1.mlp.fc1.weight", cfg) == 2
    assert layer_id("encoder.layers.1.downsample.reduction.weight", cfg) == 2  # = last block of stage 0
    assert layer_id("encoder.layers.1.blocks.0.norm1.weight", cfg) == 3
    assert layer_id("encoder.layers.2.blocks.2.attn.proj.weight", cfg) == 7
    assert layer_id("encoder.layers.3.downsample.norm.weight", cfg) == 7
    assert layer_id("encoder.layers.3.blocks.1.attn.proj.weight", cfg) == L
    assert layer_id("encoder.norm.weight", cfg) == L + 1
    assert layer_id("head.fc.weight", cfg) == L + 1
    assert layer_scale("encoder.patch_embed.proj.weight", cfg, 0.9) == pytest.approx(0.9 ** (L + 1))
    assert layer_scale("head.fc.weight", cfg, 0.9) == 1.0


def test_layer_ids_vit():
    cfg = tiny_vit_config(depths=[4], num_heads=[2]).model
    assert [layer_id(n, cfg) for n in ("encoder.cls_token", "mask_token", "encoder.patch_embed.proj.weight")] == [0] * 3
    assert layer_id("encoder.blocks.0.attn.qkv.weight", cfg) == 1
    assert layer_id("blocks.3.mlp.fc2.weight", cfg) == 4
    assert layer_id("encoder.rel_pos_bias.relative_position_bias_table", cfg) == 5  # as the official get_vit_layer
    assert layer_id("encoder.norm.weight", cfg) == 5 and layer_id("head.weight", cfg) == 5


def test_layer_decay_groups_carry_scales():
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    groups = param_groups(model, 0.05, layer_decay=0.5, model_cfg=cfg.model)
    g = _by_name(model, groups)
    L = sum(cfg.model.depths)
    assert g["mask_token"]["lr_scale"] == 0.5 ** (L + 1)
    assert g["encoder.layers.0.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** L
    assert g["head.0.weight"]["lr_scale"] == 1.0
    with pytest.raises(ValueError, match="model_cfg"):
        param_groups(model, 0.05, layer_decay=0.5)


def test_build_adamw():
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    opt = build_adamw(param_groups(model, 0.05), cfg.train, torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    with pytest.raises(ValueError, match="needs CUDA"):
        build_adamw(param_groups(model, 0.05), cfg.train, torch.device("cpu"), "torch_fused")
