import math

import pytest
import torch

from simmim_fast import BatchMaskGenerator, SimMIM, load_config
from simmim_fast.kernels import reference
from simmim_fast.models import normalize_targets

from helpers import tiny_swin_config, tiny_vit_config


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(b, 3, s, s, generator=g)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio)(b, generator=g)
    return images, mask


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
@pytest.mark.parametrize("b", [1, 3])
def test_shapes(make, b):
    cfg = make()
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, b)
    rec = model.reconstruct(images, mask)
    assert rec.shape == images.shape
    loss = model(images, mask)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert type(model.encoder).__module__.startswith("timm.")


def test_loss_is_the_formula_by_hand():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 3, 8, 12), torch.randn(2, 3, 8, 12)
    mask = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 1], [1, 0, 0]]])
    total, count = 0.0, 0
    for b in range(2):
        for y in range(8):
            for x in range(12):
                if mask[b, y // 4, x // 4]:
                    count += 1
                    total += sum(abs(pred[b, c, y, x].item() - target[b, c, y, x].item()) for c in range(3))
    expected = total / (count + 1e-5) / 3
    got = reference.masked_l1_loss(pred, target, mask, 4)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_model_loss_is_l1_of_reconstruction():
    cfg = tiny_swin_config()
    torch.manual_seed(2)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    rec = model.reconstruct(images, mask)
    m = mask.float().repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    expected = ((images - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3
    torch.testing.assert_close(model(images, mask), expected, rtol=1e-6, atol=0)


def test_unmasked_pixels_do_not_count():
    cfg = tiny_swin_config()
    torch.manual_seed(3)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    base = model(images, mask)
    b, ty, tx = (mask == 0).nonzero()[0].tolist()
    masked = (mask == 1).nonzero()[0].tolist()

    def bump(at):
        def hook(_module, _inp, out):
            out = out.clone()
            out[at[0], :, at[1] * 4 + 1, at[2] * 4 + 2] += 10.0
            return out
        return hook

    h = model.head.register_forward_hook(bump((b, ty, tx)))
    assert model(images, mask).item() == base.item()
    h.remove()
    h = model.head.register_forward_hook(bump(masked))
    assert model(images, mask).item() != base.item()  # the check above can fail
    h.remove()


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
def test_mask_token_gets_gradient(make):
    cfg = make()
    torch.manual_seed(4)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    model(images, mask).backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # Masked patches are what the loss reads, so with nothing masked the token gets no gradient.
    model(images, torch.zeros_like(mask)).backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0


def test_mask_token_replaces_masked_embeddings():
    cfg = tiny_swin_config()
    torch.manual_seed(5)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    seen = {}
    model.encoder.layers.register_forward_pre_hook(lambda _m, inp: seen.setdefault("x", inp[0]))
    model.reconstruct(images, mask)
    emb = model.encoder.patch_embed(images)
    x = seen["x"]
    sel = mask.bool()
    torch.testing.assert_close(x[sel], model.mask_token.expand(int(sel.sum()), -1))
    torch.testing.assert_close(x[~sel], emb[~sel])


def _normalize_targets_by_hand(x, k):
    b, c, h, w = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    r = k // 2
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].double()
            n = win.shape[2] * win.shape[3]
            m = win.mean((2, 3))
            q = (win * win).mean((2, 3))
            var = ((q - m * m) * n / (n - 1)).clamp(min=0)
            out[:, :, i, j] = (x[:, :, i, j].double() - m) / (var + 1e-6).sqrt()
    return out


def test_norm_targets_matches_spec():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 11, 9)
    for k in (5, 47):
        torch.testing.assert_close(normalize_targets(x, k).double(), _normalize_targets_by_hand(x, k),
                                   rtol=1e-4, atol=1e-4)


def test_norm_targets_loss():
    cfg = tiny_swin_config(norm_targets=True, norm_targets_window=7)
    torch.manual_seed(7)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    rec = model.reconstruct(images, mask)
    target = _normalize_targets_by_hand(images, 7).float()
    expected = reference.masked_l1_loss(rec, target, mask, 4)
    torch.testing.assert_close(model(images, mask), expected, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 2)
    with pytest.raises(ValueError, match="images must be"):
        model(images[:, :, :32], mask)
    with pytest.raises(ValueError, match="mask must be the token mask"):
        model(images, mask[:, :8])


def test_no_weight_decay_names():
    model = SimMIM.from_config(tiny_swin_config())
    names = model.no_weight_decay()
    assert "mask_token" in names
    assert any("relative_position_bias_table" in n for n in names)
    vit = SimMIM.from_config(tiny_vit_config())
    assert {"mask_token", "encoder.cls_token"} <= vit.no_weight_decay()
    assert any("rel_pos_bias.relative_position_bias_table" in n for n in vit.no_weight_decay())


def test_vit_is_simmim_variant():
    vit = SimMIM.from_config(tiny_vit_config()).encoder
    assert vit.pos_embed is None and vit.rel_pos_bias is not None
    assert all(blk.attn.relative_position_bias_table is None for blk in vit.blocks)
    assert torch.allclose(vit.blocks[0].gamma_1, torch.full_like(vit.blocks[0].gamma_1, 0.1))
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.blocks[0].attn.q_bias is not None


def test_swin_last_stage_has_no_shift():
    cfg = load_config("configs/swin_b.json")
    enc = SimMIM.from_config(cfg).encoder
    last = enc.layers[-1].blocks[1]
    assert tuple(last.window_size) == (6, 6) and tuple(last.shift_size) == (0, 0)
    assert tuple(enc.layers[0].blocks[1].shift_size) == (3, 3)
    large = SimMIM.from_config(load_config("configs/swin_l.json")).encoder
    assert tuple(large.layers[2].blocks[1].window_size) == (12, 12)
    assert tuple(large.layers[2].blocks[1].shift_size) == (0, 0)  # 12x12 map, window 12: no shift
    assert tuple(large.layers[3].blocks[1].window_size) == (6, 6)


@pytest.mark.parametrize("name,params_m", [("swin_b_100ep", 89.9), ("swin_b", 89.9), ("swin_l", 199.9),
                                           ("vit_b", 86.3)])
def test_paper_configs_build(name, params_m):
    cfg = load_config(f"configs/{name}.json")
    model = SimMIM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) < 0.1


@pytest.mark.timeout(300)
def test_swin_l_forward_batch_1():
    cfg = load_config("configs/swin_l.json")
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg)
    images, mask = _batch(cfg, 1)
    with torch.no_grad():
        loss = model(images, mask)
    assert torch.isfinite(loss) and 0.1 < loss.item() < 10
