import json
from pathlib import Path

import pytest

from simmim_fast import ConfigError, load_config
from simmim_fast.config_docs import schema_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_paper_hyperparameters():
    c = load_config(ROOT / "configs/swin_b_100ep.json")
    assert (c.model.embed_dim, c.model.depths, c.model.num_heads, c.model.window_size) == (128, [2, 2, 18, 2],
                                                                                           [4, 8, 16, 32], 6)
    assert (c.train.epochs, c.train.warmup_epochs, c.train.base_lr, c.train.warmup_lr, c.train.min_lr) == (
        100, 10, 2e-4, 1e-6, 1e-5)
    assert c.train.lr_scheduler == "cosine" and c.train.global_batch_size == 2048
    assert (c.mask.mask_patch_size, c.mask.mask_ratio, c.model.img_size, c.model.patch_size) == (32, 0.6, 192, 4)
    assert (c.train.weight_decay, c.train.betas, c.train.eps, c.train.clip_grad) == (0.05, (0.9, 0.999), 1e-8, 5.0)
    for name in ("swin_b", "swin_l", "vit_b"):
        c = load_config(ROOT / f"configs/{name}.json")
        assert (c.train.epochs, c.train.warmup_epochs, c.train.base_lr, c.train.warmup_lr) == (800, 10, 1e-4, 5e-7)
        assert c.train.lr_scheduler == "multistep" and c.train.decay_epochs == [700] and c.train.decay_rate == 0.1
        assert c.train.global_batch_size == 2048
    sl = load_config(ROOT / "configs/swin_l.json").model
    assert (sl.embed_dim, sl.num_heads, sl.window_size) == (192, [6, 12, 24, 48], 12)
    v = load_config(ROOT / "configs/vit_b.json").model
    assert (v.encoder, v.img_size, v.patch_size, v.embed_dim, v.depths, v.num_heads) == ("vit", 224, 16, 768, [12], [12])
    assert (v.drop_path_rate, v.layer_scale_init) == (0.1, 0.1)
    assert v.encoder_stride == 16 and load_config(ROOT / "configs/swin_b.json").model.encoder_stride == 32


@pytest.mark.parametrize("data,key,phrase", [
    ({"model": {"windw_size": 7}}, "model.windw_size", "unknown config key"),
    ({"modle": {}}, "modle", "unknown config key"),
    ({"model": {"img_size": "192"}}, "model.img_size", "must be int"),
    ({"model": {"img_size": 192.0}}, "model.img_size", "must be int"),
    ({"model": {"norm_targets": 1}}, "model.norm_targets", "must be bool"),
    ({"train": {"base_lr": "high"}}, "train.base_lr", "must be number"),
    ({"model": {"encoder": "resnet"}}, "model.encoder", 'must be "swin" or "swinv2" or "vit"'),
    ({"model": {"depths": [2, "2"]}}, "model.depths[1]", "must be int"),
    ({"model": {"img_size": 200}}, "model.img_size", "divisible by mask.mask_patch_size"),
    ({"mask": {"mask_patch_size": 30}, "model": {"img_size": 180}}, "mask.mask_patch_size",
     "divisible by model.patch_size"),
    ({"mask": {"mask_ratio": 0}}, "mask.mask_ratio", "must be in (0, 1)"),
    ({"mask": {"mask_ratio": 1.0}}, "mask.mask_ratio", "must be in (0, 1)"),
    ({"mask": {"mask_ratio": -0.2}}, "mask.mask_ratio", "must be in (0, 1)"),
    ({"model": {"num_heads": [4, 8, 16]}}, "model.num_heads", "one entry per stage"),
    ({"train": {"global_batch_size": 100, "micro_batch_size": 64}}, "train.global_batch_size", "multiple"),
    ({"engine": {"zero_stage": 4}}, "engine.zero_stage", "0, 1, 2 or 3"),
    ({"data": {"crop_scale": [0.5]}}, "data.crop_scale", "list of 2"),
    ({"train": {"lr_scheduler": "multistep", "decay_epochs": [900]}}, "train.decay_epochs", "increasing epochs"),
])
def test_bad_config_names_the_key(tmp_path, data, key, phrase):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert f"'{key}'" in msg and phrase in msg and str(f) in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_config(tmp_path / "nope.json")
    f = tmp_path / "broken.json"
    f.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(f)


def test_overrides():
    c = load_config(ROOT / "configs/swin_b.json", overrides=["train.base_lr=3e-4", "data.backend=torch",
                                                              "model.depths=[2,2,6,2]", "engine.compile=false"])
    assert c.train.base_lr == 3e-4 and c.data.backend == "torch" and c.model.depths == [2, 2, 6, 2]
    assert c.engine.compile is False
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(ROOT / "configs/swin_b.json", overrides=["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, overrides=["train.base_lr"])


def test_accumulation_steps():
    c = load_config(ROOT / "configs/swin_b.json").train
    assert c.accumulation_steps(16) == 1 and c.accumulation_steps(1) == 16 and c.accumulation_steps(8) == 2
    with pytest.raises(ConfigError, match="world size"):
        c.accumulation_steps(3)


def test_defaults_validate_and_round_trip():
    from simmim_fast.config import config_to_dict
    c = load_config(None)
    assert load_config(config_to_dict(c)) == c


def test_config_docs_are_current():
    doc = (ROOT / "docs/CONFIG.md").read_text()
    assert doc == schema_markdown(), "regenerate with: simmim-fast config-docs -o docs/CONFIG.md"
