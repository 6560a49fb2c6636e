"""export --format hf: SimMIM -> transformers folder; strict from_pretrained, same loss and hidden states."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from simmim_fast import SimMIM, load_config
from simmim_fast.cli import main as cli_main
from simmim_fast.errors import UserError
from simmim_fast.masking import BatchMaskGenerator
from simmim_fast.weights import save_state_file

from helpers import tiny_swin_config, tiny_vit_config

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

TOL = dict(rtol=1e-5, atol=1e-5)


def _trained_like(cfg, seed=0):
    """A SimMIM model with every tensor moved off its init (non-zero tables, biases, mask token)."""
    torch.manual_seed(seed)
    model = SimMIM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _export(tmp_path, cfg, model, *extra):
    src = tmp_path / "model.safetensors"
    save_state_file(str(src), model.state_dict(), cfg)
    out = tmp_path / "hf"
    assert cli_main(["export", str(src), "-o", str(out), "--format", "hf", *extra]) == 0
    return out


def _strict(cls, path):
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    return model.eval()


def _inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=g)
    mask = BatchMaskGenerator(cfg.model.img_size, cfg.mask.mask_patch_size, cfg.model.patch_size,
                              cfg.mask.mask_ratio)(batch, generator=g)
    return images, mask


def _four_band_swin():
    """Maps 24, 12, 6 with window 4 (the last stage is padded, by both libraries) and 4 input bands."""
    return load_config({"model": dict(encoder="swin", img_size=96, patch_size=4, in_chans=4, embed_dim=16,
                                      depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=4),
                        "mask": {"mask_patch_size": 16}, "data": {"mean": [0.5] * 4, "std": [0.25] * 4}})


@pytest.mark.parametrize("make_cfg", [lambda: tiny_swin_config(window_size=2, depths=[2, 2, 1, 1]),  # map == window
                                      _four_band_swin], ids=["shifted", "padded-4-band"])
def test_swin_round_trip_loss_and_hidden_states(tmp_path, make_cfg):
    cfg = make_cfg()
    model = _trained_like(cfg)
    out = _export(tmp_path, cfg, model)
    hf = _strict(transformers.SwinForMaskedImageModeling, out)
    assert hf.config.window_size == cfg.model.window_size and hf.config.layer_norm_eps == 1e-5
    images, mask = _inputs(cfg)
    with torch.no_grad():
        o = hf(images, bool_masked_pos=mask.flatten(1).bool())
        torch.testing.assert_close(o.loss, model(images, mask), **TOL)
        torch.testing.assert_close(o.reconstruction, model.reconstruct(images, mask), **TOL)
        ours = model._forward_masked(model.encoder, images, mask, model.mask_token, model._substitute)
        theirs = hf.swin(images, bool_masked_pos=mask.flatten(1).bool()).last_hidden_state
        torch.testing.assert_close(theirs.transpose(1, 2).reshape(ours.shape), ours, **TOL)
        # the encoder alone, as a fine-tuning user loads it (the SimMIM decoder and mask token are left out)
        enc = transformers.SwinModel.from_pretrained(str(out)).eval()
        feats = model.encoder.forward_features(images)                        # (B, h, w, C), final norm applied
        torch.testing.assert_close(enc(images).last_hidden_state, feats.flatten(1, 2), **TOL)
    info = json.loads((out / "simmim_export.json").read_text())
    assert info["same_geometry_as_pretraining"] and info["loss_equals_simmim"]


def test_swinv2_round_trip_loss_and_hidden_states(tmp_path):
    # maps 16, 8, 4, 2 with window 4: shifted windows in stages 1-2, the whole map (no shift) in stage 3,
    # a window shrunk to the 2x2 map in stage 4 (both libraries)
    cfg = tiny_swin_config(encoder="swinv2", depths=[2, 2, 1, 1])
    model = _trained_like(cfg)
    out = _export(tmp_path, cfg, model)
    hf = _strict(transformers.Swinv2ForMaskedImageModeling, out)
    assert hf.config.window_size == 4 and hf.config.pretrained_window_sizes == [0, 0, 0, 0]
    assert [st.blocks[0].window_size for st in hf.swinv2.encoder.layers] == [4, 4, 4, 2]
    assert hf.swinv2.encoder.layers[0].blocks[1].shift_size == 2
    images, mask = _inputs(cfg)
    with torch.no_grad():
        o = hf(images, bool_masked_pos=mask.flatten(1).bool())
        torch.testing.assert_close(o.loss, model(images, mask), **TOL)
        torch.testing.assert_close(o.reconstruction, model.reconstruct(images, mask), **TOL)
        ours = model._forward_masked(model.encoder, images, mask, model.mask_token, model._substitute)
        theirs = hf.swinv2(images, bool_masked_pos=mask.flatten(1).bool()).last_hidden_state
        torch.testing.assert_close(theirs.transpose(1, 2).reshape(ours.shape), ours, **TOL)
        enc = transformers.Swinv2Model.from_pretrained(str(out)).eval()
        feats = model.encoder.forward_features(images)                        # (B, h, w, C), final norm applied
        torch.testing.assert_close(enc(images).last_hidden_state, feats.flatten(1, 2), **TOL)
    info = json.loads((out / "simmim_export.json").read_text())
    assert info["transformers_class"] == "Swinv2ForMaskedImageModeling"
    assert info["same_geometry_as_pretraining"] and info["loss_equals_simmim"]


def test_swinv2_other_window_matches_the_timm_export(tmp_path):
    """--window-size 2: transformers gets the pretraining stage windows, as the timm export, and the same features."""
    from simmim_fast.tools.export import build_timm_model, timm_target
    cfg = tiny_swin_config(encoder="swinv2", depths=[2, 2, 1, 1])
    model = _trained_like(cfg)
    out = _export(tmp_path, cfg, model, "--window-size", "2")
    hf = _strict(transformers.Swinv2ForMaskedImageModeling, out)
    assert hf.config.pretrained_window_sizes == [4, 4, 4, 2]
    name, kwargs = timm_target(cfg, window_size=2)
    timm_model = build_timm_model(name, kwargs, device="cpu").eval()
    timm_model.load_state_dict(model.encoder.state_dict())  # the same encoder at window 2 (all keys, strict)
    images, _ = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf.swinv2(images).last_hidden_state,
                                   timm_model.forward_features(images).flatten(1, 2), **TOL)


def test_swinv2_stage_window_of_one_at_another_window_is_refused(tmp_path, capsys):
    cfg = tiny_swin_config(encoder="swinv2", img_size=32)  # maps 8, 4, 2, 1: the last stage's window is 1
    src = tmp_path / "model.safetensors"
    save_state_file(str(src), SimMIM.from_config(cfg).state_dict(), cfg)
    assert cli_main(["export", str(src), "-o", str(tmp_path / "no"), "--format", "hf", "--window-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[4, 4, 2, 1]" in err and not (tmp_path / "no").exists()


def test_vit_round_trip_hidden_states_and_head(tmp_path):
    cfg = tiny_vit_config()
    model = _trained_like(cfg)
    out = _export(tmp_path, cfg, model)
    hf = _strict(transformers.BeitModel, out)
    c = hf.config
    assert (c.layer_norm_eps, c.use_shared_relative_position_bias, c.use_relative_position_bias,
            c.use_absolute_position_embeddings, c.use_mask_token, c.use_mean_pooling) == (1e-6, True, False, False,
                                                                                         True, False)
    images, mask = _inputs(cfg)
    with torch.no_grad():
        o = hf(images, bool_masked_pos=mask.flatten(1).bool())
        ours = model._forward_masked(model.encoder, images, mask, model.mask_token, model._substitute)
        b, ch, h, w = ours.shape
        tokens = o.last_hidden_state[:, 1:].transpose(1, 2).reshape(b, ch, h, w)
        torch.testing.assert_close(tokens, ours, **TOL)
        torch.testing.assert_close(o.pooler_output, o.last_hidden_state[:, 0])  # cls token, no extra weights
        # the head written beside the model reproduces our reconstruction from transformers' tokens
        head = load_file(str(out / "simmim_head.safetensors"))
        rec = F.pixel_shuffle(F.conv2d(tokens, head["weight"], head["bias"]), cfg.model.patch_size)
        torch.testing.assert_close(rec, model.reconstruct(images, mask), **TOL)


def test_processor_carries_the_normalisation(tmp_path):
    cfg = tiny_vit_config()
    cfg.data.mean, cfg.data.std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    out = _export(tmp_path, cfg, SimMIM.from_config(cfg))
    proc = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert list(proc.image_mean) == [0.1, 0.2, 0.3] and list(proc.image_std) == [0.4, 0.5, 0.6]
    assert proc.size["height"] == proc.size["width"] == cfg.model.img_size
    pixels = proc(images=[torch.full((3, 20, 30), 255, dtype=torch.uint8).numpy().transpose(1, 2, 0)],
                  return_tensors="pt")["pixel_values"]
    expected = (1 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.4, 0.5, 0.6])
    torch.testing.assert_close(pixels[0, :, 5, 5], expected, rtol=1e-4, atol=1e-4)


def test_swin_window_larger_than_a_stage_map_is_refused_or_resized(tmp_path, capsys):
    cfg = tiny_swin_config()  # window 4, stage maps 16, 8, 4, 2
    model = _trained_like(cfg)
    src = tmp_path / "model.safetensors"
    save_state_file(str(src), model.state_dict(), cfg)
    assert cli_main(["export", str(src), "-o", str(tmp_path / "no"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage 4: 2x2" in err and "--window-size 2" in err
    assert not (tmp_path / "no").exists()
    out = _export(tmp_path, cfg, model, "--window-size", "2")  # tables resized 7x7 -> 3x3, bicubic
    hf = _strict(transformers.SwinForMaskedImageModeling, out)
    assert hf.config.window_size == 2
    t = hf.swin.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert t.shape == (9, 1)
    assert not json.loads((out / "simmim_export.json").read_text())["same_geometry_as_pretraining"]
    images, mask = _inputs(cfg)
    with torch.no_grad():
        assert torch.isfinite(hf(images, bool_masked_pos=mask.flatten(1).bool()).loss)


def test_timm_only_options_and_missing_transformers(tmp_path, monkeypatch, capsys):
    cfg = tiny_vit_config()
    src = tmp_path / "model.safetensors"
    save_state_file(str(src), SimMIM.from_config(cfg).state_dict(), cfg)
    assert cli_main(["export", str(src), "-o", str(tmp_path / "x"), "--format", "hf", "--vit-pool", "avg"]) == 2
    assert "--vit-pool" in capsys.readouterr().err
    assert cli_main(["export", str(src), "-o", str(tmp_path / "x"), "--format", "hf", "--window-size", "4"]) == 2
    assert "Swin option" in capsys.readouterr().err
    from simmim_fast.tools.hf_export import require_transformers
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match=r"simmim-fast\[hf\]"):
        require_transformers()
    assert cli_main(["export", str(src), "-o", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert "pip install 'simmim-fast[hf]'" in capsys.readouterr().err
