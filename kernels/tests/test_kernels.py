"""The fused Triton ops against the plain-PyTorch references, forward and backward.

On a CPU the kernels run in Triton's interpreter (kernels/tests/conftest.py sets TRITON_INTERPRET=1), on
small shapes; with CUDA (and TRITON_INTERPRET=0) the same tests run compiled on the GPU, plus the
full SimMIM sizes. Every buffer a kernel writes is allocated NaN-filled (the ``poison`` fixture),
so an element a kernel fails to write shows up.
"""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from simmim_kernels import _utils, mask_substitute, masked_l1, mask_token_substitute, masked_l1_loss
from simmim_kernels import reference as ref

INTERPRETED = (_utils.TRITON_IMPORT_ERROR is None
               and _utils.triton_interpreted(mask_substitute._mask_substitute_fwd_kernel))
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() and not INTERPRETED else [])
if not DEVICES:
    pytest.skip("no device can run the Triton kernels (CPU needs TRITON_INTERPRET=1)", allow_module_level=True)
DEVICE = DEVICES[0]
ON_GPU = DEVICE == "cuda"

# Relative tolerance by dtype: fp32 ~1e-6; bf16 / fp16 one ulp. (The kernels round to nearest even
# in the interpreter too, see kernels/simmim_kernels/_triton_helpers.py, so on the CPU most checks are exact.)
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float64: 1e-12}
TINY = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 6e-8, torch.float64: 1e-300}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output buffer starts as NaN: a kernel must overwrite all of it."""
    def alloc(shape, *, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    def alloc_like(t, dtype=None):
        return torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format).fill_(float("nan"))

    monkeypatch.setattr(_utils, "alloc", alloc)
    monkeypatch.setattr(_utils, "alloc_like", alloc_like)


def assert_close(actual, expected, dtype=None, rtol=None):
    """|actual - expected| <= rtol(dtype) * |expected| elementwise (NaN anywhere fails)."""
    dtype = dtype or expected.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), f"non-finite values in the result: {a[~torch.isfinite(a)][:8]}"
    err = (a - e).abs()
    tol = rtol * e.abs() + TINY[dtype]
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off; worst |err| {err.max().item():.3g} "
                           f"at {torch.nonzero(bad)[0].tolist()}: got {a[bad][0].item()!r}, want {e[bad][0].item()!r}")


def make_mask(kind, shape, gen, device):
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.uint8, device=device)
    if kind == "one":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "random":
        return (torch.rand(shape, generator=gen) < 0.6).to(device)
    if kind == "random_u8":
        return (torch.rand(shape, generator=gen) < 0.6).to(torch.uint8).to(device)
    if kind == "blend":  # float masks blend; keep exact 0s and 1s in it too
        m = torch.rand(shape, generator=gen)
        m[torch.rand(shape, generator=gen) < 0.3] = 0.0
        m[torch.rand(shape, generator=gen) < 0.3] = 1.0
        return m.to(device)
    raise ValueError(kind)


def randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


def seed(*key):
    """A generator seeded from the test's parameters (stable across runs, different per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------------------------------
# mask-token substitution
# --------------------------------------------------------------------------------------------------

def token_grad_truth(g, mask, x_dtype, token):
    """sum over positions of g * w in fp64, w = mask as x's dtype; and sum |g * w| for the error bound."""
    w = mask.to(x_dtype).double().reshape(-1, 1)
    gw = g.double().reshape(-1, g.shape[-1]) * w
    return gw.sum(0).reshape(token.shape), gw.abs().sum(0).reshape(token.shape)


def check_substitute(x, mask, token, g=None, rtol="exact on CPU"):
    """Fused vs reference: forward output, grad_x, grad_token (the last against an fp64 sum).

    out and grad_x round exactly where the reference rounds, so on the CPU (no FMA contraction)
    they must match it bit for bit; on a GPU within the dtype's tolerance."""
    if rtol == "exact on CPU":
        rtol = None if ON_GPU else 0.0
    x = x.detach().requires_grad_()
    token = token.detach().requires_grad_()
    out = mask_token_substitute(x, mask, token, backend="triton")
    xr, tr = x.detach().clone().requires_grad_(), token.detach().clone().requires_grad_()
    expected = ref.mask_token_substitute(xr, mask, tr)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert_close(out, expected, rtol=rtol)
    if g is None:
        g = torch.randn(x.shape, generator=seed("g", tuple(x.shape)), dtype=torch.float32).to(x.dtype).to(x.device)
    grad_x, grad_token = torch.autograd.grad(out, (x, token), g)
    grad_xr, _ = torch.autograd.grad(expected, (xr, tr), g)
    assert grad_x.dtype == x.dtype and grad_token.dtype == token.dtype and grad_token.shape == token.shape
    assert_close(grad_x, grad_xr, rtol=rtol)
    truth, scale = token_grad_truth(g, mask, x.dtype, token)
    # fp32 accumulation (relative to the sum of |terms|), then one rounding to the token's dtype.
    err = (grad_token.double().cpu() - truth.cpu()).abs()
    tol = 1e-6 * scale.cpu() + RTOL[token.dtype] * truth.abs().cpu() + 1e-30
    assert torch.isfinite(grad_token).all() and (err <= tol).all(), (err.max(), grad_token, truth)
    return out, grad_x, grad_token


SUB_CASES = [
    # (B, spatial, C)
    *itertools.product([1, 3], [(7, 5), (11,)], [3, 96, 128, 130]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["zero", "one", "random", "blend"])
@pytest.mark.parametrize("b,spatial,c", SUB_CASES)
def test_substitute_matches_reference(b, spatial, c, dtype, mask_kind):
    gen = seed("sub", b, spatial, c, dtype, mask_kind)
    x = randn((b, *spatial, c), gen, dtype, DEVICE)
    mask = make_mask(mask_kind, (b, *spatial), gen, DEVICE)
    token = randn((c,), gen, torch.float32, DEVICE)
    out, grad_x, grad_token = check_substitute(x, mask, token)
    if mask_kind == "zero":
        assert torch.equal(out, x) and (grad_token == 0).all()
    if mask_kind == "one":
        assert (grad_x == 0).all()
        assert_close(out, token.to(dtype).expand_as(x), rtol=0)


def test_substitute_48x48():
    gen = seed("sub48")
    x = randn((1, 48, 48, 128), gen, torch.float32, DEVICE)
    mask = make_mask("random", (1, 48, 48), gen, DEVICE)
    check_substitute(x, mask, randn((128,), gen, torch.float32, DEVICE))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64,
                                        torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("token_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_substitute_mask_and_token_dtypes(mask_dtype, token_dtype):
    gen = seed("dtypes", mask_dtype, token_dtype)
    x = randn((2, 3, 5, 24), gen, torch.bfloat16, DEVICE)
    kind = "blend" if mask_dtype.is_floating_point else "random"
    mask = make_mask(kind, (2, 3, 5), gen, DEVICE).to(mask_dtype)
    # fp64 masks: the interpreter goes fp64 -> fp32 -> bf16, which may round a tie differently
    check_substitute(x, mask, randn((24,), gen, token_dtype, DEVICE), rtol=None)


def test_substitute_token_shapes():
    gen = seed("token shapes")
    x = randn((2, 6, 10), gen, torch.float32, DEVICE)
    mask = make_mask("random", (2, 6), gen, DEVICE)
    check_substitute(x, mask, randn((1, 1, 10), gen, torch.float32, DEVICE))


def test_substitute_many_programs_and_ragged_tiles(monkeypatch):
    """Tiny tiles: many row and column programs, ragged edges, backward loops over row blocks."""
    monkeypatch.setattr(mask_substitute, "MAX_BLOCK_COLS", 32)
    monkeypatch.setattr(mask_substitute, "BLOCK_ELEMENTS", 128)   # 4 rows x 32 columns
    monkeypatch.setattr(mask_substitute, "BWD_TARGET_PROGRAMS", 15)  # 3 row programs x 5 column programs
    gen = seed("ragged")
    for dtype in (torch.float32, torch.bfloat16):
        x = randn((3, 7, 5, 130), gen, dtype, DEVICE)   # 105 rows = 27 blocks of 4 (last ragged)
        mask = make_mask("random", (3, 7, 5), gen, DEVICE)
        check_substitute(x, mask, randn((130,), gen, torch.float32, DEVICE))


def test_substitute_non_contiguous():
    gen = seed("strided")
    base = randn((2, 5, 7, 40), gen, torch.float32, DEVICE)
    mask_t = make_mask("random", (2, 5, 7), gen, DEVICE).transpose(1, 2)         # (2, 7, 5), strided
    token = randn((64,), gen, torch.float32, DEVICE)[::2]                       # stride 2
    g = randn((2, 7, 5, 64), gen, torch.float32, DEVICE)[..., ::2]              # strided grad
    check_substitute(base[..., 4:36].transpose(1, 2), mask_t, token[:32], g=g)  # permuted + sliced x
    check_substitute(base[..., :32], mask_t.transpose(1, 2), token[:32])        # row stride 40 != C


def test_substitute_skips_x_under_the_token():
    """Where the mask is 1 the output is the token even if x is inf/NaN there (x is not read)."""
    x = torch.randn(1, 4, 3, device=DEVICE)
    mask = torch.tensor([[1, 0, 1, 0]], device=DEVICE, dtype=torch.bool)
    x[0, 0] = float("nan")
    x[0, 2] = float("inf")
    token = torch.randn(3, device=DEVICE)
    out = mask_token_substitute(x, mask, token, backend="triton")
    torch.testing.assert_close(out[0, 0], token)
    torch.testing.assert_close(out[0, 2], token)
    torch.testing.assert_close(out[0, 1], x[0, 1])


def test_substitute_backward_is_deterministic():
    gen = seed("det")
    x = randn((3, 9, 7, 96), gen, torch.bfloat16, DEVICE).requires_grad_()
    mask = make_mask("random", (3, 9, 7), gen, DEVICE)
    token = randn((96,), gen, torch.float32, DEVICE).requires_grad_()
    g = randn(x.shape, gen, torch.bfloat16, DEVICE)
    first = torch.autograd.grad(mask_token_substitute(x, mask, token, backend="triton"), token, g)[0]
    second = torch.autograd.grad(mask_token_substitute(x, mask, token, backend="triton"), token, g)[0]
    assert torch.equal(first, second)


def test_substitute_gradcheck_fp64():
    gen = seed("gradcheck sub")
    x = randn((2, 3, 5), gen, torch.float64, DEVICE).requires_grad_()
    token = randn((5,), gen, torch.float64, DEVICE).requires_grad_()
    for mask in (make_mask("random", (2, 3), gen, DEVICE), make_mask("blend", (2, 3), gen, DEVICE).double()):
        assert torch.autograd.gradcheck(lambda a, t: mask_token_substitute(a, mask, t, backend="triton"), (x, token))


def test_substitute_only_needed_grads():
    gen = seed("needs grad")
    x = randn((2, 4, 8), gen, torch.float32, DEVICE)
    mask = make_mask("random", (2, 4), gen, DEVICE)
    token = randn((8,), gen, torch.float32, DEVICE).requires_grad_()
    out = mask_token_substitute(x, mask, token, backend="triton")
    (grad_token,) = torch.autograd.grad(out.sum(), token)
    torch.testing.assert_close(grad_token, mask.float().sum().expand(8))


# --------------------------------------------------------------------------------------------------
# masked L1 loss
# --------------------------------------------------------------------------------------------------

def l1_truth(pred, target, mask, p, eps=1e-5):
    m = mask.double().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    return ((pred.double() - target.double()).abs() * m).sum() / (m.sum() + eps) / pred.shape[1]


def check_l1(pred, target, mask, p, eps=1e-5, grad_loss=None, target_grad=False, pixel_shuffle=1, loss_rtol=2e-6):
    pred = pred.detach().requires_grad_()
    target = target.detach().requires_grad_(target_grad)
    loss = masked_l1_loss(pred, target, mask, p, eps, backend="triton", pixel_shuffle=pixel_shuffle)
    pr, tr = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_(target_grad)
    pred_image = F.pixel_shuffle(pr, pixel_shuffle) if pixel_shuffle > 1 else pr
    expected = ref.masked_l1_loss(pred_image, tr, mask, p, eps)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.device == pred.device
    truth = l1_truth(pred_image.detach(), target, mask, p, eps)
    assert_close(loss, truth, torch.float32, rtol=loss_rtol)
    assert_close(loss, expected, torch.float32, rtol=loss_rtol)
    if grad_loss is None:
        grad_loss = torch.tensor(1.7, device=pred.device)
    inputs = (pred, target) if target_grad else (pred,)
    grads = torch.autograd.grad(loss, inputs, grad_loss)
    grads_ref = torch.autograd.grad(expected, (pr, tr) if target_grad else (pr,), grad_loss)
    for got, want, t in zip(grads, grads_ref, inputs):
        # same layout as the input where torch.empty_like keeps it (dense inputs, e.g. channels-last)
        assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == torch.empty_like(t).stride()
        # fp32 math on both sides; a bf16/fp16 result may be one ulp apart (rounding mode on CPU).
        assert_close(got, want, rtol=max(RTOL[t.dtype], 2e-6))
    return loss, grads


L1_CASES = [
    # (B, C, grid h, grid w, patch)
    (1, 3, 7, 5, 4), (3, 3, 7, 5, 4), (3, 3, 2, 3, 8), (1, 130, 3, 2, 4), (3, 1, 5, 7, 2),
]


@pytest.mark.parametrize("target_dtype", ["fp32", "pred"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["zero", "one", "random", "random_u8", "blend"])
@pytest.mark.parametrize("b,c,gh,gw,p", L1_CASES)
def test_l1_matches_reference(b, c, gh, gw, p, mask_kind, dtype, target_dtype):
    gen = seed("l1", b, c, gh, gw, p, mask_kind, dtype, target_dtype)
    pred = randn((b, c, gh * p, gw * p), gen, dtype, DEVICE)
    target = randn((b, c, gh * p, gw * p), gen, torch.float32 if target_dtype == "fp32" else dtype, DEVICE)
    mask = make_mask(mask_kind, (b, gh, gw), gen, DEVICE)
    loss, (grad_pred,) = check_l1(pred, target, mask, p)
    if mask_kind == "zero":
        assert loss.item() == 0.0 and (grad_pred == 0).all()


def test_l1_48x48_grid():
    gen = seed("l1 48")
    pred = randn((1, 3, 192, 192), gen, torch.bfloat16, DEVICE)
    mask = make_mask("random", (1, 48, 48), gen, DEVICE)
    check_l1(pred, randn((1, 3, 192, 192), gen, torch.float32, DEVICE), mask, 4)


def test_l1_many_programs_and_final_loop(monkeypatch):
    """Small pixel runs: many programs per image, a ragged last run, a final reduction that loops."""
    monkeypatch.setattr(masked_l1, "BLOCK_PIXELS", 16)
    monkeypatch.setattr(masked_l1, "FINAL_BLOCK", 4)
    gen = seed("l1 ragged")
    pred = randn((3, 3, 28, 20), gen, torch.float32, DEVICE)       # 560 pixels = 35 runs of 16 per image
    mask = make_mask("random", (3, 7, 5), gen, DEVICE)
    check_l1(pred, randn(pred.shape, gen, torch.float32, DEVICE), mask, 4)


def test_l1_gradient_for_target_and_grad_scale():
    gen = seed("l1 target grad")
    f32, bf16 = torch.float32, torch.bfloat16
    for dtype, tdtype in ((f32, f32), (bf16, f32), (bf16, bf16)):
        pred = randn((2, 3, 12, 8), gen, dtype, DEVICE)
        mask = make_mask("random", (2, 3, 2), gen, DEVICE)
        check_l1(pred, randn(pred.shape, gen, tdtype, DEVICE), mask, 4, target_grad=True,
                 grad_loss=torch.tensor(-0.37, device=DEVICE))


def test_l1_ties_give_zero_gradient():
    gen = seed("l1 ties")
    pred = randn((1, 3, 8, 8), gen, torch.float32, DEVICE)
    target = pred.clone()
    target[:, :, :4] += 1.0
    mask = torch.ones(1, 2, 2, device=DEVICE)
    _, (grad,) = check_l1(pred, target, mask, 4)
    assert (grad[:, :, 4:] == 0).all() and (grad[:, :, :4] != 0).all()


def test_l1_eps():
    gen = seed("l1 eps")
    pred = randn((2, 3, 8, 8), gen, torch.float32, DEVICE)
    mask = make_mask("random", (2, 2, 2), gen, DEVICE)
    check_l1(pred, randn(pred.shape, gen, torch.float32, DEVICE), mask, 4, eps=0.5)


def test_l1_non_contiguous():
    gen = seed("l1 strided")
    pred = randn((2, 3, 12, 16), gen, torch.bfloat16, DEVICE).contiguous(memory_format=torch.channels_last)
    target = randn((2, 5, 16, 12), gen, torch.float32, DEVICE)[:, 1:4].transpose(2, 3)   # sliced + transposed
    mask = make_mask("random", (2, 4, 3), gen, DEVICE).transpose(1, 2)                  # (2, 3, 4) strided
    _, (grad, _) = check_l1(pred, target, mask, 4, target_grad=True)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("s,p", [(4, 4), (8, 4), (2, 4)])
def test_l1_unshuffled_pred(s, p):
    """pred as the head's output before PixelShuffle(s): same loss and gradient as shuffling first."""
    gen = seed("l1 shuffle", s, p)
    b, c, h, w = 2, 3, 24, 16
    pred = randn((b, c * s * s, h // s, w // s), gen, torch.bfloat16, DEVICE)
    mask = make_mask("random", (b, h // p, w // p), gen, DEVICE)
    check_l1(pred, randn((b, c, h, w), gen, torch.float32, DEVICE), mask, p, pixel_shuffle=s)


def test_l1_unmasked_pixels_are_not_read():
    """A NaN where the mask is 0 cannot change the loss: it is not read, its gradient is 0."""
    gen = seed("l1 nan")
    pred = randn((1, 3, 8, 8), gen, torch.float32, DEVICE).requires_grad_()
    target = randn((1, 3, 8, 8), gen, torch.float32, DEVICE)
    mask = torch.tensor([[[1, 0], [0, 1]]], device=DEVICE)
    with torch.no_grad():
        clean = masked_l1_loss(pred, target, mask, 4, backend="triton")
        pred[0, 1, 0, 5] = float("nan")
        target[0, 2, 6, 1] = float("inf")
    loss = masked_l1_loss(pred, target, mask, 4, backend="triton")
    assert loss.item() == clean.item()
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(grad).all() and grad[0, 1, 0, 5] == 0


def test_l1_deterministic():
    gen = seed("l1 det")
    pred = randn((3, 3, 40, 36), gen, torch.bfloat16, DEVICE)
    target = randn(pred.shape, gen, torch.float32, DEVICE)
    mask = make_mask("blend", (3, 10, 9), gen, DEVICE)
    a = masked_l1_loss(pred, target, mask, 4, backend="triton")
    b = masked_l1_loss(pred, target, mask, 4, backend="triton")
    assert torch.equal(a, b)


def test_l1_gradcheck_fp64():
    gen = seed("l1 gradcheck")
    pred = randn((2, 2, 2, 4), gen, torch.float64, DEVICE).requires_grad_()
    target = randn((2, 2, 2, 4), gen, torch.float64, DEVICE).requires_grad_()
    for mask in (make_mask("random", (2, 1, 2), gen, DEVICE), make_mask("blend", (2, 1, 2), gen, DEVICE).double()):
        mask[0, 0, 0] = 1  # never all zero
        fn = lambda p, t: masked_l1_loss(p, t, mask, 2, backend="triton")  # noqa: E731
        assert fn(pred, target).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, (pred, target))


def test_empty_batch():
    x = torch.randn(0, 3, 5, 8, device=DEVICE, requires_grad=True)
    token = torch.randn(8, device=DEVICE, requires_grad=True)
    out = mask_token_substitute(x, torch.ones(0, 3, 5, device=DEVICE), token, backend="triton")
    assert out.shape == x.shape
    grad_x, grad_token = torch.autograd.grad(out, (x, token), torch.randn_like(out))
    assert grad_x.shape == x.shape and torch.equal(grad_token, torch.zeros_like(token))
    pred = torch.randn(0, 3, 8, 8, device=DEVICE, requires_grad=True)
    loss = masked_l1_loss(pred, torch.randn(0, 3, 8, 8, device=DEVICE), torch.ones(0, 2, 2, device=DEVICE), 4,
                          backend="triton")
    assert loss.item() == 0.0 and torch.autograd.grad(loss, pred)[0].shape == pred.shape


# --------------------------------------------------------------------------------------------------
# backend choice and argument errors
# --------------------------------------------------------------------------------------------------

def test_backend_torch_is_the_reference():
    gen = seed("backend torch")
    x = randn((2, 3, 4, 8), gen, torch.float32, DEVICE)
    mask = make_mask("random", (2, 3, 4), gen, DEVICE)
    token = randn((8,), gen, torch.float32, DEVICE)
    out = mask_token_substitute(x, mask, token, backend="torch")
    assert out.grad_fn is None or "MaskTokenSubstitute" not in type(out.grad_fn).__name__
    assert torch.equal(out, ref.mask_token_substitute(x, mask, token))


def test_backend_auto_picks_triton_only_on_cuda():
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    mask = torch.rand(2, 3, device=DEVICE) > 0.5
    out = mask_token_substitute(x, mask, torch.zeros(8, device=DEVICE), backend="auto")
    fused = type(out.grad_fn).__name__.startswith("MaskTokenSubstituteFunction")
    assert fused == (DEVICE == "cuda")
    pred, target = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True), torch.randn(2, 3, 8, 8, device=DEVICE)
    loss = masked_l1_loss(pred, target, torch.ones(2, 2, 2, device=DEVICE), 4, backend="auto")
    assert type(loss.grad_fn).__name__.startswith("MaskedL1LossFunction") == (DEVICE == "cuda")


def test_mask_requiring_grad():
    x = torch.randn(2, 3, 8, device=DEVICE)
    fmask = torch.rand(2, 3, device=DEVICE, requires_grad=True)
    token = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="mask requires grad"):
        mask_token_substitute(x, fmask, token, backend="triton")
    out = mask_token_substitute(x, fmask, token, backend="auto")   # the reference, which differentiates it
    assert torch.autograd.grad(out.sum(), fmask)[0].shape == fmask.shape
    with torch.no_grad():
        mask_token_substitute(x, fmask, token, backend="triton")   # nothing to differentiate: fine


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_utils, "triton_interpreted", lambda kernel: False)
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mask_token_substitute(x, torch.ones(2, 3), torch.zeros(8), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_l1_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.ones(1, 1, 1), 4, backend="triton")
    # auto never needs the interpreter
    mask_token_substitute(x, torch.ones(2, 3), torch.zeros(8), backend="auto")


def test_unsupported_dtype_for_triton():
    x = torch.randn(2, 3, 8, device=DEVICE).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="supports float dtypes"):
        mask_token_substitute(x, torch.ones(2, 3, device=DEVICE), torch.zeros(8, device=DEVICE), backend="triton")


E = ValueError
ERROR_CASES = [
    ("bad backend", lambda: mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(4), backend="cuda"),
     r"backend must be one of"),
    ("x int", lambda: mask_token_substitute(torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(2, 3), torch.ones(4),
                                            backend="triton"), "x must be a floating-point"),
    ("mask shape", lambda: mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 4), torch.ones(4),
                                                 backend="triton"),
     r"mask must have shape x.shape\[:-1\] = \(2, 3\), got mask \(2, 4\) for x \(2, 3, 4\)"),
    ("mask batch", lambda: mask_token_substitute(torch.ones(2, 3, 5, 4), torch.ones(3, 3, 5), torch.ones(4),
                                                 backend="triton"), r"got mask \(3, 3, 5\)"),
    ("token length", lambda: mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(5),
                                                   backend="triton"),
     r"mask_token must hold C = 4 .* got shape \(5\)"),
    ("token int", lambda: mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(4, dtype=torch.int64),
                                                backend="triton"), "mask_token must be floating point"),
    ("x rank", lambda: mask_token_substitute(torch.ones(4), torch.ones(()), torch.ones(4), backend="triton"),
     "channels-last"),
    ("devices", lambda: mask_token_substitute(torch.ones(2, 3, 4), torch.ones(2, 3, device="meta"), torch.ones(4),
                                              backend="triton"), "different devices"),
    ("l1 target shape", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 4), torch.ones(2, 2, 2), 4,
                                               backend="triton"), r"target must have pred's shape \(2, 3, 8, 8\)"),
    ("l1 H divisible", lambda: masked_l1_loss(torch.ones(2, 3, 8, 10), torch.ones(2, 3, 8, 10), torch.ones(2, 2, 2), 4,
                                              backend="triton"),
     r"H and W \(8, 10\) must be divisible by patch_size 4"),
    ("l1 mask batch", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(3, 2, 2), 4,
                                             backend="triton"), r"= \(2, 2, 2\), got mask \(3, 2, 2\)"),
    ("l1 mask grid", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 4, 4), 4,
                                            backend="triton"), r"got mask \(2, 4, 4\)"),
    ("l1 pred int", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8, dtype=torch.int64), torch.ones(2, 3, 8, 8),
                                           torch.ones(2, 2, 2), 4, backend="triton"), "pred must be floating point"),
    ("l1 devices", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8, device="meta"),
                                          torch.ones(2, 2, 2), 4, backend="triton"), "different devices"),
    ("l1 patch", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2), 0,
                                        backend="triton"), "patch_size must be a positive int"),
    ("l1 backend", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2), 4,
                                          backend="fast"), "backend must be one of"),
    ("l1 shuffle shape", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2), 4,
                                                backend="triton", pixel_shuffle=4),
     r"pixel_shuffle=4, pred must be the un-shuffled head output .* = \(2, 48, 2, 2\) .* got pred \(2, 3, 8, 8\)"),
    ("l1 shuffle value", lambda: masked_l1_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2), 4,
                                                pixel_shuffle=0), "pixel_shuffle must be a positive int"),
]


@pytest.mark.parametrize("name,call,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_argument(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# full SimMIM sizes: GPU only (run by the tests part of benchmarks/gpu_all.sh)
# --------------------------------------------------------------------------------------------------

FULL = [((128, 48, 48, 128), torch.bfloat16), ((128, 48, 48, 192), torch.bfloat16), ((128, 196, 768), torch.bfloat16),
        ((128, 48, 48, 128), torch.float32)]


@pytest.mark.skipif(not ON_GPU, reason="full SimMIM sizes run on a GPU")
@pytest.mark.parametrize("shape,dtype", FULL, ids=lambda v: str(v))
def test_full_size_substitute(shape, dtype):
    gen = seed("full sub", shape, dtype)
    x = randn(shape, gen, dtype, DEVICE)
    mask = make_mask("random", shape[:-1], gen, DEVICE)
    check_substitute(x, mask, randn((shape[-1],), gen, torch.float32, DEVICE), rtol=RTOL[dtype])


@pytest.mark.skipif(not ON_GPU, reason="full SimMIM sizes run on a GPU")
@pytest.mark.parametrize("img,p,dtype", [(192, 4, torch.bfloat16), (224, 16, torch.bfloat16), (192, 4, torch.float32)],
                         ids=str)
def test_full_size_l1(img, p, dtype):
    gen = seed("full l1", img, p, dtype)
    pred = randn((128, 3, img, img), gen, dtype, DEVICE)
    mask = make_mask("random", (128, img // p, img // p), gen, DEVICE)
    check_l1(pred, randn(pred.shape, gen, torch.float32, DEVICE), mask, p, loss_rtol=1e-5)
    s = 32 if p == 4 else 16
    unshuffled = randn((128, 3 * s * s, img // s, img // s), gen, dtype, DEVICE)
    check_l1(unshuffled, randn(pred.shape, gen, torch.float32, DEVICE), mask, p, pixel_shuffle=s, loss_rtol=1e-5)
