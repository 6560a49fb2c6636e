"""export: SimMIM encoder -> plain timm weights (exact tensors, strict loads, table interpolation)."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from simmim_fast import SimMIM, load_config
from simmim_fast.cli import main as cli_main
from simmim_fast.tools.export import (build_timm_model, convert_to_timm, encoder_state_dict, resize_rel_pos_table,
                                      timm_target)
from simmim_fast.weights import save_state_file

from helpers import tiny_swin_config, tiny_vit_config


def _simmim_state(cfg, device="cpu", seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        return SimMIM.from_config(cfg).state_dict()


def _strict_load(name, kwargs, weights, num_classes=0):
    """Load into a meta-device timm model: checks every key and shape, allocates nothing."""
    model = build_timm_model(name, kwargs, num_classes=num_classes)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    return [k for k in missing if not k.startswith("head.")], unexpected


def test_swin_b_exact_round_trip_and_strict_timm_load():
    cfg = load_config("configs/swin_b.json")
    state = _simmim_state(cfg)
    name, kwargs = timm_target(cfg)
    assert name == "swin_base_patch4_window7_224" and kwargs == {"img_size": 192, "window_size": 6}
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    assert weights.keys() == enc.keys()
    for k, v in weights.items():
        assert torch.equal(v, enc[k]), k
    assert not any(k.startswith("head") or "mask_token" in k for k in weights)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(weights, strict=True)


def test_swin_b_window_6_to_7_interpolates_tables_only():
    cfg = load_config("configs/swin_b.json")
    state = _simmim_state(cfg, seed=1)
    name, kwargs = timm_target(cfg, "swin_base_patch4_window7_224")
    assert kwargs == {}
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    assert _strict_load(name, kwargs, weights) == ([], [])
    for k, v in weights.items():
        src = state["encoder." + k]
        if k.endswith("relative_position_bias_table"):
            assert src.shape[0] == 11 ** 2 and v.shape == (13 ** 2, src.shape[1])
            assert torch.equal(v, resize_rel_pos_table(src, 13 ** 2))
        else:
            assert torch.equal(v, src), k


def test_swin_l_window_12_to_14_strict_keys_and_shapes():
    cfg = load_config("configs/swin_l.json")
    state = _simmim_state(cfg, device="meta")
    name, kwargs = timm_target(cfg, "swin_large_patch4_window7_224", window_size=14)
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    assert _strict_load(name, kwargs, weights) == ([], [])
    # Stage 3 (12 x 12 map at 192 px) had window 12, stage 4 (6 x 6) shrank to 6; at 224 they are 14 and 7.
    assert state["encoder.layers.2.blocks.0.attn.relative_position_bias_table"].shape == (23 ** 2, 24)
    assert weights["layers.2.blocks.0.attn.relative_position_bias_table"].shape == (27 ** 2, 24)
    assert state["encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (11 ** 2, 48)
    assert weights["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (13 ** 2, 48)


def test_vit_b_shared_table_to_every_block_and_norm_to_fc_norm():
    cfg = load_config("configs/vit_b.json")
    state = _simmim_state(cfg, seed=2)
    name, kwargs = timm_target(cfg)
    assert name == "beit_base_patch16_224" and kwargs == {}
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    assert _strict_load(name, kwargs, weights) == ([], [])
    shared = state["encoder.rel_pos_bias.relative_position_bias_table"]
    assert shared.shape == (27 ** 2 + 3, 12)
    for i in range(12):
        assert torch.equal(weights[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert torch.equal(weights["fc_norm.weight"], state["encoder.norm.weight"])
    assert "norm.weight" not in weights and "rel_pos_bias.relative_position_bias_table" not in weights
    for k, v in weights.items():
        if "relative_position_bias_table" not in k and not k.startswith("fc_norm"):
            assert torch.equal(v, state["encoder." + k]), k


def test_vit_finetune_at_new_size_keeps_cls_entries():
    cfg = tiny_vit_config()   # 64 px, patch 8: 8 x 8 grid -> 15^2 + 3 table
    state = _simmim_state(cfg, seed=3)
    name, kwargs = timm_target(cfg, img_size=96)
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    assert _strict_load(name, kwargs, weights) == ([], [])
    shared = state["encoder.rel_pos_bias.relative_position_bias_table"]
    table = weights["blocks.1.attn.relative_position_bias_table"]
    assert table.shape == (23 ** 2 + 3, 2)
    assert torch.equal(table[-3:], shared[-3:])


def test_resize_rel_pos_table_is_bicubic_on_the_grid():
    torch.manual_seed(0)
    table = torch.randn(11 ** 2 + 3, 4)
    assert torch.equal(resize_rel_pos_table(table, 11 ** 2 + 3, num_extra=3), table)
    out = resize_rel_pos_table(table, 13 ** 2 + 3, num_extra=3)
    grid = table[:-3].t().reshape(1, 4, 11, 11)
    expected = F.interpolate(grid, size=(13, 13), mode="bicubic", align_corners=False).reshape(4, 169).t()
    torch.testing.assert_close(out[:-3], expected)
    assert torch.equal(out[-3:], table[-3:])
    const = torch.full((11 ** 2, 2), 0.25)
    torch.testing.assert_close(resize_rel_pos_table(const, 13 ** 2), torch.full((13 ** 2, 2), 0.25))
    with pytest.raises(ValueError, match="square"):
        resize_rel_pos_table(table, 100)


def test_wrong_target_and_bad_state_are_named():
    cfg = load_config("configs/swin_l.json")
    with pytest.raises(ValueError, match="embed_dim 192 .checkpoint. vs 128"):
        timm_target(cfg, "swin_base_patch4_window7_224")
    with pytest.raises(ValueError, match="does not fit model.encoder"):
        timm_target(cfg, "beit_base_patch16_224")
    with pytest.raises(ValueError, match="not a SimMIM state dict"):
        encoder_state_dict({"blocks.0.weight": torch.zeros(1)})
    small = tiny_swin_config()
    name, kwargs = timm_target(small)
    state = encoder_state_dict(_simmim_state(small))
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="layers.1.blocks.0.mlp.fc1.weight"):
        convert_to_timm(state, build_timm_model(name, kwargs))


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
def test_cli_export_loads_with_timm_pretrained_cfg_overlay(make, tmp_path):
    cfg = make()
    state = _simmim_state(cfg, seed=4)
    src = tmp_path / "simmim.pt"
    save_state_file(str(src), state, cfg)
    assert cli_main(["export", str(src), "-o", str(tmp_path / "enc")]) == 0
    info = json.loads((tmp_path / "enc.json").read_text())
    name, kwargs = info["model_name"], info["model_kwargs"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    for suffix in ("safetensors", "pth"):
        # num_classes=0 matches the overlay's, so timm loads strictly: any missing or extra key fails.
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / f"enc.{suffix}"), num_classes=0))
        sd = model.state_dict()
        for k, v in state.items():
            k = k[len("encoder."):]
            if k.startswith(("mask_token", "head.")) or "encoder." + k not in state:
                continue
            if "relative_position_bias_table" in k and k.startswith("rel_pos_bias"):
                assert torch.equal(sd["blocks.0.attn.relative_position_bias_table"], v)
            elif k.startswith("norm.") and "fc_norm." + k[5:] in sd:
                assert torch.equal(sd["fc_norm." + k[5:]], v)
            else:
                assert torch.equal(sd[k], v), k
        # The documented call: a new classifier of N classes on top.
        model = timm.create_model(name, pretrained=True, num_classes=7, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / f"enc.{suffix}")))
        assert model(torch.zeros(1, 3, cfg.model.img_size, cfg.model.img_size)).shape == (1, 7)
