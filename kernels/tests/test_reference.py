"""The plain-PyTorch references: exact formulas and the promised argument errors."""
import pytest
import torch

from simmim_kernels import reference as ref


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 11, 6)])
@pytest.mark.parametrize("mdtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_substitute_formula(shape, mdtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    mask = torch.rand(shape[:-1]) > 0.5
    token = torch.randn(shape[-1])
    out = ref.mask_token_substitute(x, mask.to(mdtype), token)
    expected = torch.where(mask.unsqueeze(-1), token.expand_as(x), x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    fmask = torch.rand(shape[:-1])  # float masks blend
    w = fmask.unsqueeze(-1)
    torch.testing.assert_close(ref.mask_token_substitute(x, fmask, token), x * (1 - w) + token * w)


@pytest.mark.parametrize("call,match", [
    (lambda: ref.mask_token_substitute(torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(2, 3), torch.ones(4)),
     "x must be a floating-point"),
    (lambda: ref.mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 4), torch.ones(4)), r"mask must have shape"),
    (lambda: ref.mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(5)), "mask_token must hold C = 4"),
    (lambda: ref.mask_token_substitute(torch.ones(4), torch.ones(()), torch.ones(4)), r"channels-last"),
    (lambda: ref.masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 4), torch.ones(2, 2, 2), 4),
     "target must have pred's shape"),
    (lambda: ref.masked_l1_loss(torch.ones(2, 3, 8, 10), torch.ones(2, 3, 8, 10), torch.ones(2, 2, 2), 4),
     "must be divisible by patch_size 4"),
    (lambda: ref.masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(3, 2, 2), 4),
     r"mask must be the token-level mask of shape .* = \(2, 2, 2\), got mask \(3, 2, 2\)"),
    (lambda: ref.masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 4, 4), 4),
     r"got mask \(2, 4, 4\)"),
    (lambda: ref.masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2), 0),
     "patch_size must be a positive int"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_l1_all_zero_mask_is_zero():
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert ref.masked_l1_loss(pred, target, torch.zeros(2, 2, 2), 4).item() == 0.0
