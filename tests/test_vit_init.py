"""ViT initialisation = the official VisionTransformerForSimMIM rule (microsoft/SimMIM models/simmim.py).

The rule: cls token, mask token, every Linear weight and the patch-embedding conv ~ N(0, 0.02)
truncated at +-0.02 (+-1 std); Linear / conv biases 0; LayerNorm (1, 0); relative position table
and q/v biases 0; layer scale = init value; then block i's attn.proj and mlp.fc2 weights / sqrt(2 (i + 1)).
Each group's sample mean and variance must lie within 5 standard errors of the truncated normal's
exact moments (fixed seed, so the test is deterministic).
"""
import math

import pytest
import torch

from simmim_fast.models import SimMIM

from helpers import tiny_vit_config

STD = 0.02
_PHI1 = math.exp(-0.5) / math.sqrt(2 * math.pi)  # standard normal density at 1
_Z = math.erf(1 / math.sqrt(2))                  # P(|N(0, 1)| < 1)
UNIT_VAR = 1 - 2 * _PHI1 / _Z                    # variance of N(0, 1) truncated at +-1 (0.29113)
UNIT_M4 = 3 - 2 * _PHI1 * (1 + 3) / _Z           # its fourth moment (0.16450)


def test_truncated_normal_moments():
    assert math.sqrt(UNIT_VAR) * STD == pytest.approx(0.0107912, abs=1e-7)  # effective std of the official init
    x = torch.empty(2_000_000, dtype=torch.float64).normal_(generator=torch.Generator().manual_seed(0))
    x = x[x.abs() < 1]
    assert x.var().item() == pytest.approx(UNIT_VAR, rel=5e-3)
    assert (x ** 4).mean().item() == pytest.approx(UNIT_M4, rel=5e-3)


def _check_group(name, values: torch.Tensor, scale: float, check_edge: bool):
    """values ~ scale * STD * (N(0, 1) truncated at +-1)."""
    u = values.detach().double().flatten() / (scale * STD)
    n = u.numel()
    assert u.abs().max().item() <= 1 + 1e-5, f"{name}: values beyond the +-1 std cut"
    if check_edge:  # the cut is not narrower than +-1 std (with n >= 2000 values, P(no |u| > 0.98) < 1e-12)
        assert u.abs().max().item() > 0.98, f"{name}: no value near the cut"
    mean_se = math.sqrt(UNIT_VAR / n)
    assert abs(u.mean().item()) < 5 * mean_se, f"{name}: mean {u.mean().item() * scale * STD:.3g}"
    var_se = math.sqrt((UNIT_M4 - UNIT_VAR ** 2) / n)
    var = (u ** 2).mean().item()  # about the known mean 0
    assert abs(var - UNIT_VAR) < 5 * var_se, (
        f"{name}: std {math.sqrt(var) * scale * STD:.5f}, expected {math.sqrt(UNIT_VAR) * scale * STD:.5f} "
        f"+- {2.5 * var_se / math.sqrt(UNIT_VAR) * scale * STD:.1e}")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = tiny_vit_config(embed_dim=64, depths=[3], num_heads=[2], layer_scale_init=0.1)
    return SimMIM.from_config(cfg), cfg


def test_vit_init_statistics_per_group(vit):
    model, cfg = vit
    enc = model.encoder
    params = dict(model.named_parameters())
    seen = set()

    def take(*names):
        seen.update(names)
        return torch.cat([params[n].flatten() for n in names])

    _check_group("cls + mask token", take("encoder.cls_token", "mask_token"), 1.0, check_edge=False)
    _check_group("patch_embed.proj.weight", take("encoder.patch_embed.proj.weight"), 1.0, check_edge=True)
    depth = len(enc.blocks)
    _check_group("qkv + fc1 weights", take(*[f"encoder.blocks.{i}.{w}.weight" for i in range(depth)
                                            for w in ("attn.qkv", "mlp.fc1")]), 1.0, check_edge=True)
    for i in range(depth):  # fix_init_weight: / sqrt(2 * (layer_id + 1))
        scale = 1 / math.sqrt(2 * (i + 1))
        for w in ("attn.proj", "mlp.fc2"):
            _check_group(f"block {i} {w}.weight", take(f"encoder.blocks.{i}.{w}.weight"), scale, check_edge=True)
    for name, p in params.items():
        if name.startswith("head.") or name in seen:
            continue  # the decoder conv keeps PyTorch's default, as the official SimMIM decoder
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            expected = 1.0
        elif name.endswith(("gamma_1", "gamma_2")):
            expected = cfg.model.layer_scale_init
        else:  # every bias, q_bias / v_bias, the shared relative position bias table
            assert name.endswith(("bias", "relative_position_bias_table")), name
            expected = 0.0
        assert torch.equal(p.detach(), torch.full_like(p, expected)), f"{name} is not {expected}"


def test_vit_init_is_seeded_and_builds_on_meta():
    cfg = tiny_vit_config()
    torch.manual_seed(3)
    a = SimMIM.from_config(cfg).state_dict()
    torch.manual_seed(3)
    b = SimMIM.from_config(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.device("meta"):  # checkpoint readers build the model on the meta device
        SimMIM.from_config(cfg)
