"""SwinV2 encoder (model.encoder 'swinv2'): shapes, the loss formula, where the mask token goes, the
official SwinV2 computation, weight decay groups and export to timm."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2

from simmim_fast import BatchMaskGenerator, SimMIM, load_config
from simmim_fast.config import ConfigError
from simmim_fast.engine.optim import layer_id
from simmim_fast.errors import UserError
from simmim_fast.models import normalize_targets
from simmim_fast.tools.export import convert_to_timm, encoder_state_dict, timm_target
from simmim_fast.weights import build_timm_model, simmim_param_groups


def v2_config(**model):
    m = dict(encoder="swinv2", img_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
             window_size=4)
    m.update(model)
    return load_config({"model": m, "mask": {"mask_patch_size": 16, "mask_ratio": 0.6}})


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, c = cfg.model.img_size, cfg.model.in_chans
    images = torch.randn(b, c, s, s, generator=g)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio)(b, generator=g)
    return images, mask


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = SimMIM.from_config(cfg)
    with torch.no_grad():  # res-post-norms start at 0: give them weights so every block changes its output
        for name, p in model.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_forward_backward_shapes(b, in_chans):
    cfg = load_config({"model": dict(v2_config().model.__dict__, in_chans=in_chans), "mask": {"mask_patch_size": 16},
                       "data": {"mean": [0.5] * in_chans, "std": [0.25] * in_chans}})
    model = _model(cfg)
    assert type(model.encoder) is SwinTransformerV2
    images, mask = _batch(cfg, b)
    rec = model.reconstruct(images, mask)
    assert rec.shape == images.shape
    loss = model(images, mask)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.mask_token.grad.abs().sum() > 0
    assert model.encoder.layers[0].blocks[0].attn.cpb_mlp[0].weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].blocks[0].attn.logit_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("norm_targets", [False, True])
def test_loss_is_the_simmim_formula(norm_targets):
    cfg = v2_config(norm_targets=norm_targets, norm_targets_window=7)
    model = _model(cfg, seed=3)
    images, mask = _batch(cfg, 2, seed=4)
    rec = model.reconstruct(images, mask)
    target = normalize_targets(images, 7) if norm_targets else images
    m = mask.float().repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    expected = ((target - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3
    torch.testing.assert_close(model(images, mask), expected, rtol=1e-6, atol=0)


def test_mask_token_replaces_patch_embeddings_before_the_first_block():
    cfg = v2_config()
    model = _model(cfg, seed=5).eval()
    images, mask = _batch(cfg, 2, seed=6)
    seen = {}
    hook = model.encoder.layers[0].blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model.reconstruct(images, mask)
    hook.remove()
    embedded = model.encoder.patch_embed(images)                      # (B, 16, 16, C) after its LayerNorm
    m = mask.bool().unsqueeze(-1)
    expected = torch.where(m, model.mask_token.expand_as(embedded), embedded)
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-6)
    # so the pixels of masked patches cannot reach the output, and those of visible patches do
    pix = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()
    noise = torch.randn_like(images)
    with torch.no_grad():
        base = model.reconstruct(images, mask)
        assert torch.equal(model.reconstruct(torch.where(pix, noise, images), mask), base)
        assert not torch.allclose(model.reconstruct(torch.where(pix, images, noise), mask), base)


# --- an independent reference of the official SwinV2 forward (microsoft/Swin-Transformer
# models/swin_transformer_v2.py + models/simmim.py): tokens (B, L, C), patch merging at the end of a
# stage, the window rule min(resolution) <= window -> whole map, no shift; coordinates, index and shift
# masks computed here, not taken from timm's buffers.

def _ref_coords_table(w):
    r = torch.arange(-(w - 1), w, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(r, r, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
    t = t / (w - 1) * 8 if w > 1 else t
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def _ref_index(w):
    c = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + w - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)


def _partition(x, w):
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _reverse(win, w, h, wd):
    b = win.shape[0] // (h * wd // w // w)
    return win.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


def _ref_shift_mask(h, w, s):
    img = torch.zeros(1, h, h, 1)
    cnt = 0
    for a in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for b in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, a, b, :] = cnt
            cnt += 1
    mw = _partition(img, w).squeeze(-1)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def _ref_attention(attn, x, w, mask):
    bn, n, c = x.shape
    heads = attn.num_heads
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(bn, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    a = a * torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = attn.cpb_mlp(_ref_coords_table(w)).view(-1, heads)
    rpb = table[_ref_index(w).view(-1)].view(w * w, w * w, -1).permute(2, 0, 1).contiguous()
    a = a + 16 * torch.sigmoid(rpb).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        a = (a.view(bn // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    a = a.softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(bn, n, c))


def _ref_block(blk, x, res, window, shift):
    b, L, c = x.shape
    shortcut = x
    h = x.view(b, res, res, c)
    if shift:
        h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
    win = _ref_attention(blk.attn, _partition(h, window), window, _ref_shift_mask(res, window, shift) if shift else None)
    h = _reverse(win.view(-1, window, window, c), window, res, res)
    if shift:
        h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + blk.norm1(h.reshape(b, L, c))
    return x + blk.norm2(blk.mlp(x))


def _ref_merge(down, x, res):
    b, L, c = x.shape
    x = x.view(b, res, res, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    return down.norm(down.reduction(x))


def _official_simmim_forward(model, images, mask, window):
    enc = model.encoder
    x = enc.patch_embed.norm(enc.patch_embed.proj(images).flatten(2).transpose(1, 2))
    b, L, _ = x.shape
    w = mask.flatten(1).unsqueeze(-1).type_as(x)
    x = x * (1.0 - w) + model.mask_token.view(1, 1, -1).expand(b, L, -1) * w
    res = int(L ** 0.5)
    for i, stage in enumerate(enc.layers):
        win, shift = (res, 0) if res <= window else (window, window // 2)
        for j, blk in enumerate(stage.blocks):
            x = _ref_block(blk, x, res, win, shift if j % 2 else 0)
        if i + 1 < len(enc.layers):
            x = _ref_merge(enc.layers[i + 1].downsample, x, res)
            res //= 2
    x = enc.norm(x).transpose(1, 2)
    return model.head(x.reshape(b, -1, res, res))


@pytest.mark.parametrize("img_size, window", [(64, 4), (192, 6), (192, 12)])
def test_timm_swinv2_computes_the_official_forward(img_size, window):
    cfg = load_config({"model": dict(encoder="swinv2", img_size=img_size, patch_size=4, embed_dim=8,
                                     depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=window),
                       "mask": {"mask_patch_size": 32 if img_size == 192 else 16}})
    model = _model(cfg, seed=7).eval()
    images, mask = _batch(cfg, 2, seed=8)
    with torch.no_grad():
        ours = model.reconstruct(images, mask)
        official = _official_simmim_forward(model, images, mask, window)
    assert torch.equal(ours, official), (ours - official).abs().max()


def test_res_post_norm_init_and_defaults():
    model = SimMIM.from_config(v2_config())
    for stage in model.encoder.layers:
        for blk in stage.blocks:
            for norm in (blk.norm1, blk.norm2):
                assert torch.equal(norm.weight, torch.zeros_like(norm.weight))
                assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
            torch.testing.assert_close(blk.attn.logit_scale, torch.full_like(blk.attn.logit_scale, math.log(10)))
            assert blk.attn.pretrained_window_size == (0, 0) and not blk.always_partition
    windows = [stage.blocks[0].window_size for stage in model.encoder.layers]
    assert windows == [(4, 4), (4, 4), (4, 4), (2, 2)]  # the 2 x 2 last stage: the whole map


def test_weight_decay_excludes_cpb_mlp_logit_scale_and_mask_token():
    cfg = v2_config()
    model = SimMIM.from_config(cfg)
    groups = simmim_param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "mask_token" in plain
    assert {n for n in names.values() if "cpb_mlp" in n or "logit_scale" in n} <= plain
    assert "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight" in plain
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in decayed
    assert "encoder.layers.1.downsample.reduction.weight" in decayed
    assert "head.0.weight" in decayed
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)


def test_layer_ids_follow_the_swin_rule():
    m = v2_config().model
    assert layer_id("encoder.patch_embed.proj.weight", m) == 0
    assert layer_id("encoder.layers.0.blocks.1.attn.cpb_mlp.0.weight", m) == 2
    assert layer_id("encoder.layers.1.downsample.reduction.weight", m) == 2
    assert layer_id("encoder.layers.3.blocks.1.mlp.fc2.weight", m) == 8
    assert layer_id("encoder.norm.weight", m) == 9


def test_window_that_does_not_tile_a_stage_is_refused():
    with pytest.raises(ConfigError, match="model.window_size"):
        v2_config(window_size=3)  # 16 x 16 tokens: 3 neither divides it nor covers it


def test_export_loads_strictly_into_timm():
    cfg = v2_config()
    model = _model(cfg, seed=9).eval()
    state = encoder_state_dict(model.state_dict())
    assert not any(k.endswith(("relative_coords_table", "relative_position_index", "attn_mask")) for k in state)
    name, kwargs = timm_target(cfg)
    assert name.startswith("swinv2_")
    target = build_timm_model(name, kwargs, device="cpu")
    assert type(target) is SwinTransformerV2
    target.load_state_dict(convert_to_timm(state, target), strict=True)
    images, _ = _batch(cfg, 2, seed=10)
    with torch.no_grad():
        assert torch.equal(target.eval().forward_features(images), model.encoder.forward_features(images))


def test_export_to_another_window_passes_the_pretraining_windows():
    cfg = load_config({"model": dict(encoder="swinv2", img_size=192, embed_dim=128, depths=[2, 2, 18, 2],
                                     num_heads=[4, 8, 16, 32], window_size=12)})
    assert timm_target(cfg) == ("swinv2_base_window12_192", {})
    assert timm_target(cfg, "swinv2_base_window12to16_192to256") == ("swinv2_base_window12to16_192to256", {})
    name, kwargs = timm_target(cfg, "swinv2_base_window12_192", img_size=256, window_size=16)
    assert kwargs == {"img_size": 256, "window_size": 16, "pretrained_window_sizes": (12, 12, 12, 6)}
    with torch.device("meta"):
        model = SimMIM.from_config(cfg)
    target = build_timm_model(name, kwargs)
    converted = convert_to_timm(encoder_state_dict(model.state_dict()), target)
    assert set(converted) == set(target.state_dict())
    assert target.layers[0].blocks[0].attn.pretrained_window_size == (12, 12)
    with pytest.raises(UserError, match="use a swinv2_"):
        timm_target(cfg, "swin_base_patch4_window7_224")


def test_finetune_classifier_from_swinv2_with_checkpointing():
    from simmim_fast.jobs.finetune import apply_activation_checkpointing, build_classifier
    pre = v2_config()
    state = _model(pre, seed=11).state_dict()
    ft = load_config(pre, overrides=["engine.activation_checkpointing=true"])
    net, (name, _) = build_classifier(ft, 5, (pre, state))
    assert name.startswith("swinv2_") and net.num_classes == 5
    sd = net.state_dict()
    assert all(torch.equal(sd[k[len("encoder."):]], v) for k, v in state.items() if k.startswith("encoder."))
    apply_activation_checkpointing(net, ft)
    assert all(stage.grad_checkpointing for stage in net.layers)
    images, _ = _batch(pre, 2, seed=12)
    torch.manual_seed(0)
    net.train()(images).sum().backward()  # timm's checkpointed stages run
    with pytest.raises(UserError, match="engine.activation_checkpointing"):
        apply_activation_checkpointing(net, load_config(pre, overrides=["engine.activation_checkpointing=2"]))


def test_knn_features_of_a_swinv2_encoder():
    from simmim_fast.tools.features import pooled_features
    cfg = v2_config()
    model = _model(cfg, seed=13).eval()
    images, _ = _batch(cfg, 3, seed=14)
    feats = pooled_features(model.encoder, images)
    assert feats.shape == (3, model.encoder.num_features)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.encoder.forward_features(images).mean(dim=(1, 2)))
