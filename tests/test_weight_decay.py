"""train.decay_position_bias: true decays exactly what the official SimMIM pretraining decayed.

The official rule (microsoft/SimMIM optimizer.py get_pretrain_param_groups, microsoft/Swin-Transformer
optimizer.py set_weight_decay) is reproduced here on the official parameter names and shapes: no decay
for 1-D tensors, names ending in ``.bias``, names in ``SimMIM.no_weight_decay()`` (the encoder's list
prefixed with ``encoder.``) and names containing one of ``SimMIM.no_weight_decay_keywords()`` (also
prefixed with ``encoder.``, hence never found in ``encoder.layers.0...``: Swin-Transformer issue #369).
"""
import pytest
from timm.models.swin_transformer_v2 import SwinTransformerV2

from helpers import tiny_swin_config, tiny_vit_config
from simmim_fast import SimMIM, load_config
from simmim_fast.config import config_to_dict
from simmim_fast.weights import simmim_param_groups

# encoder: (no_weight_decay(), no_weight_decay_keywords()) of the official SimMIM encoder classes
OFFICIAL_LISTS = {
    "swin": ({"absolute_pos_embed", "mask_token"}, {"relative_position_bias_table"}),
    "swinv2": ({"absolute_pos_embed", "mask_token"}, {"cpb_mlp", "logit_scale", "relative_position_bias_table"}),
    "vit": ({"pos_embed", "cls_token"}, set()),  # VisionTransformerForSimMIM adds nothing, has no keywords
}


def _official_name_shape(name, p):
    """Our SimMIM parameter -> the official one: the mask token lives on the official encoder as
    (1, 1, C), the head is called decoder; the timm encoders use the official names otherwise."""
    if name == "mask_token":
        return "encoder.mask_token", (1, 1, p.shape[0])
    if name.startswith("head."):
        return "decoder." + name[len("head."):], tuple(p.shape)
    return name, tuple(p.shape)


def official_decayed(model, encoder):
    names, keywords = OFFICIAL_LISTS[encoder]
    skip = {"encoder." + n for n in names}          # SimMIM.no_weight_decay()
    skip_keywords = {"encoder." + k for k in keywords}  # SimMIM.no_weight_decay_keywords()
    decayed = set()
    for ours, p in model.named_parameters():
        name, shape = _official_name_shape(ours, p)
        if not (len(shape) == 1 or name.endswith(".bias") or name in skip
                or any(k in name for k in skip_keywords)):
            decayed.add(ours)
    return decayed


def _decayed(model, cfg):
    groups = simmim_param_groups(model, cfg)
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _with(cfg, **train):
    d = config_to_dict(cfg)
    d["train"].update(train)
    return load_config(d)


@pytest.mark.parametrize("encoder", ["swin", "vit"])
@pytest.mark.parametrize("layer_decay", [1.0, 0.8])
def test_decay_position_bias_matches_the_official_rule(encoder, layer_decay):
    base = tiny_swin_config() if encoder == "swin" else tiny_vit_config()
    model = SimMIM.from_config(base)
    ours = _decayed(model, _with(base, layer_decay=layer_decay))
    official = _decayed(model, _with(base, layer_decay=layer_decay, decay_position_bias=True))
    assert official == official_decayed(model, encoder)
    # the difference is what the docs say, and nothing else
    if encoder == "swin":
        assert official - ours == {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
        assert len(official - ours) == sum(base.model.depths)
    else:
        assert official - ours == {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table"}
    assert ours <= official


def test_decay_position_bias_covers_swinv2_names():
    """The rule is by parameter name: a SwinV2 encoder's cpb MLP weights and logit scales are decayed
    as the official run decayed them, its cpb MLP bias (1-D) and the mask token are not."""
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    model.encoder = SwinTransformerV2(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 2, 4), window_size=4, num_classes=0)
    extra = model.official_decayed_names()
    assert any("cpb_mlp.0.weight" in n for n in extra) and any("logit_scale" in n for n in extra)
    assert not any(n.endswith(".bias") for n in extra) and "mask_token" not in extra
    official = _decayed(model, _with(cfg, decay_position_bias=True))
    assert official == official_decayed(model, "swinv2")


def test_default_exempts_position_bias():
    cfg = tiny_vit_config()
    model = SimMIM.from_config(cfg)
    decayed = _decayed(model, cfg)
    assert cfg.train.decay_position_bias is False
    assert not any("relative_position_bias_table" in n or n == "mask_token" for n in decayed)
