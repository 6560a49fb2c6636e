"""The fused window attention against the plain-PyTorch reference, forward and backward.

On a CPU the kernels run in Triton's interpreter (kernels/tests/conftest.py sets TRITON_INTERPRET=1),
about 0.1 s per program instance, so the shapes are tiny: 1 to 8 windows of 9, 36 or 144 tokens.
Every buffer a kernel writes starts NaN-filled (the ``poison`` fixture). The comparison with timm's
SwinTransformerBlock is in tests/test_window_attention_model.py (this package does not import timm).
"""
import importlib
import zlib

import pytest
import torch

from simmim_kernels import _utils, reference as ref
from simmim_kernels import window_attention

# The module of the same name as the op (the package exports the op under that name).
wa_module = importlib.import_module("simmim_kernels.window_attention")

INTERPRETED = (_utils.TRITON_IMPORT_ERROR is None
               and _utils.triton_interpreted(wa_module._window_attention_fwd_kernel))
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() and not INTERPRETED else [])
if not DEVICES:
    pytest.skip("no device can run the Triton kernels (CPU needs TRITON_INTERPRET=1)", allow_module_level=True)
DEVICE = DEVICES[0]

# max |fused - reference| / max |reference|. fp32: IEEE products, fp32 softmax, only summation order
# differs. bf16 / fp16: P and dS are rounded to the input dtype before their matmuls (as
# FlashAttention does) and the result once more, against a reference that stays fp32 throughout.
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output buffer starts as NaN: a kernel must overwrite all of it."""
    def alloc(shape, *, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    def alloc_like(t, dtype=None):
        return torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format).fill_(float("nan"))

    monkeypatch.setattr(_utils, "alloc", alloc)
    monkeypatch.setattr(_utils, "alloc_like", alloc_like)


def seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def assert_rel_close(actual, expected, dtype, what):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a[~torch.isfinite(a)][:8]}"
    err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
    assert err <= REL_TOL[dtype], f"{what}: max error {err:.3g} of max |value| (tolerance {REL_TOL[dtype]:.3g})"


def make_inputs(b, h, w, ws, heads, head_dim, dtype, bias_dtype=torch.float32, bias_4d=False, key=()):
    gen = seed(b, h, w, ws, heads, head_dim, str(dtype), str(bias_dtype), bias_4d, *key)
    n = ws * ws
    qkv = torch.randn(b, h, w, 3 * heads * head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    # Larger than trained biases, so that they (and the -100 of the shift mask) matter.
    bias = (2 * torch.randn(heads, n, n, generator=gen)).to(dtype=bias_dtype, device=DEVICE)
    if bias_4d:
        bias = bias.unsqueeze(0)
    grad = torch.randn(b, h, w, heads * head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    return qkv, bias, grad


def check(b, h, w, ws, shift, heads, head_dim, dtype=torch.float32, **kw):
    qkv, bias, grad = make_inputs(b, h, w, ws, heads, head_dim, dtype, **kw)
    q1, b1 = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
    out = window_attention(q1, b1, heads, ws, shift, backend="triton")
    assert out.shape == (b, h, w, heads * head_dim) and out.dtype == dtype
    dq, db = torch.autograd.grad(out, (q1, b1), grad)
    q2, b2 = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
    expected = ref.window_attention(q2, b2, heads, ws, shift)
    dq_ref, db_ref = torch.autograd.grad(expected, (q2, b2), grad)
    assert dq.dtype == qkv.dtype and db.dtype == bias.dtype and db.shape == bias.shape
    assert_rel_close(out, expected, dtype, "out")
    assert_rel_close(dq, dq_ref, dtype, "d(qkv)")
    assert_rel_close(db, db_ref, dtype, "d(bias)")
    return out, dq, db


CASES = [
    # (B, H, W, window, shift, heads, head_dim)
    (1, 12, 12, 6, 3, 1, 16),     # 2x2 windows, shifted: all nine mask regions
    (1, 12, 12, 6, 0, 1, 32),
    (3, 6, 12, 6, 3, 1, 16),      # H != W, batch 3
    (1, 6, 12, 6, 2, 3, 32),      # 3 heads, head dim 32, another shift
    (1, 6, 6, 6, 3, 1, 16),       # one window per image, shifted (always_partition-style)
    (1, 12, 24, 12, 6, 1, 32),    # window 12: N = 144 padded to 256, query blocks of 64
    (3, 3, 3, 3, 0, 3, 16),       # the last-stage rule: one window of the whole 3x3 map, N = 9
]


@pytest.mark.parametrize("b,h,w,ws,shift,heads,head_dim", CASES)
def test_matches_reference_fp32(b, h, w, ws, shift, heads, head_dim):
    check(b, h, w, ws, shift, heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias_dtype,bias_4d", [(torch.float32, False), ("qkv", True)])
def test_matches_reference_low_precision(dtype, bias_dtype, bias_4d):
    check(1, 12, 12, 6, 3, 2, 16, dtype=dtype, bias_dtype=dtype if bias_dtype == "qkv" else bias_dtype,
          bias_4d=bias_4d)


def test_several_query_blocks_and_windows_per_program(monkeypatch):
    """The backward's other code paths: a window split into query blocks (d(bias) summed in the
    program's partial buffer) and programs that loop over several windows."""
    monkeypatch.setattr(wa_module, "MAX_BLOCK_M", 16)          # N = 36 -> 64 padded, 3 blocks of 16
    monkeypatch.setattr(wa_module, "BWD_TARGET_PROGRAMS", 2)   # 1 head: 2 programs of 2 windows
    assert wa_module._bwd_groups(4, 1) == (2, 2)
    check(1, 12, 12, 6, 3, 1, 16)
    monkeypatch.setattr(wa_module, "BWD_TARGET_PROGRAMS", 3)   # 5 windows: 2, 2, 1
    check(5, 6, 6, 6, 0, 1, 16)


def test_backward_is_deterministic():
    qkv, bias, grad = make_inputs(1, 12, 12, 6, 2, 16, torch.float32)
    results = []
    for _ in range(2):
        q, bb = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
        out = window_attention(q, bb, 2, 6, 3, backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, bb), grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_mask_is_added_not_skipped():
    """With logits far above 100 the -100 of the shift mask does not remove cross-region keys; a
    kernel that dropped them (-inf) would differ here."""
    qkv, bias, grad = make_inputs(1, 6, 6, 6, 1, 16, torch.float32)
    qkv = qkv * 12  # |q k^T| * scale in the hundreds
    out = window_attention(qkv, bias, 1, 6, 3, backend="triton")
    expected = ref.window_attention(qkv, bias, 1, 6, 3)
    assert_rel_close(out, expected, torch.float32, "out")
    n = 36
    hard = ref.window_attention(qkv, bias - 1e9 * (ref.shift_window_mask(6, 6, 6, 3) != 0).float().view(1, n, n),
                                1, 6, 3)
    assert (hard - expected).abs().max() > 1e-2


def test_reference_shift_mask_regions():
    mask = ref.shift_window_mask(12, 12, 6, 3)
    assert mask.shape == (4, 36, 36)
    assert (mask[0] == 0).all()                      # the top-left window is one region
    # the bottom-right window holds four regions of 9 tokens: each token sees 9 keys unmasked
    assert ((mask[3] == 0).sum(-1) == 9).all()
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_auto_backend_and_errors():
    qkv, bias, _ = make_inputs(1, 6, 6, 6, 1, 16, torch.float32)
    expected = ref.window_attention(qkv, bias, 1, 6, 0)
    auto = window_attention(qkv, bias, 1, 6, 0)  # CPU: the reference
    assert torch.equal(auto, expected) if DEVICE == "cpu" else True
    with pytest.raises(ValueError, match="multiples of window_size"):
        window_attention(qkv[:, :5], bias, 1, 6, 0)
    with pytest.raises(ValueError, match="shift_size"):
        window_attention(qkv, bias, 1, 6, 6)
    with pytest.raises(ValueError, match="bias must be"):
        window_attention(qkv, bias[:, :35], 1, 6, 0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        window_attention(qkv, bias, 5, 6, 0)
    with pytest.raises(ValueError, match="backend must be"):
        window_attention(qkv, bias, 1, 6, 0, backend="cuda")
    with pytest.raises(ValueError, match="bias in fp32 or qkv's dtype"):
        window_attention(qkv.half(), bias.bfloat16(), 1, 6, 0, backend="triton")
    # fp64 is the reference's only: "auto" takes it, "triton" says why not
    assert window_attention(qkv.double(), bias.double(), 1, 6, 0).dtype == torch.float64
    with pytest.raises(ValueError, match="qkv dtypes"):
        window_attention(qkv.double(), bias.double(), 1, 6, 0, backend="triton")


def test_scale_argument():
    qkv, bias, _ = make_inputs(1, 6, 6, 6, 1, 16, torch.float32)
    out = window_attention(qkv, bias, 1, 6, 0, scale=0.3, backend="triton")
    assert_rel_close(out, ref.window_attention(qkv, bias, 1, 6, 0, scale=0.3), torch.float32, "out")
