"""model.attention: "fused" gives timm's loss and gradients, with the same state dict, eager and compiled.

The tiny Swin has two blocks per stage, so every other block is shifted where the map is larger
than the window: stage 1 (8x8 map, window 4, shift 2, four windows, head dim 8 padded to 16),
stage 2 (4x4 = one window, no shift: timm's last-stage rule), stages 3-4 (2x2 and 1x1 maps: the
window shrinks to the map, N = 4 and 1). On the CPU the op runs in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).
"""
import os
import sys

import pytest
import torch

from simmim_fast import BatchMaskGenerator, SimMIM
from simmim_fast.kernels import _utils
from simmim_fast.models.swin import FusedSwinTransformerBlock

from helpers import tiny_swin_config

wa_module = sys.modules["simmim_fast.kernels.window_attention"]
INTERPRETED = (_utils.TRITON_IMPORT_ERROR is None
               and _utils.triton_interpreted(wa_module._window_attention_fwd_kernel))
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
GRAD_RTOL, GRAD_ATOL = (1e-4, 1e-6) if DEVICE == "cpu" else (1e-3, 1e-5)
SLOW = pytest.mark.skipif(not os.environ.get("SIMMIM_SLOW_TESTS"),
                          reason="minutes on a CPU; SIMMIM_SLOW_TESTS=1 runs it")


def _cfg(attention, stages=4):
    return tiny_swin_config(img_size=32, depths=[2] * stages, num_heads=[2, 2, 4, 4][:stages], attention=attention,
                            ops_backend="triton")


def _model(attention, stages=4):
    torch.manual_seed(0)
    model = SimMIM.from_config(_cfg(attention, stages)).to(DEVICE)
    with torch.no_grad():  # biases larger than the init, so that a wrong bias or mask shows
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    return model


def _batch(b=1, seed=0):
    cfg = _cfg("timm")
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(b, 3, s, s, generator=g)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio)(b, generator=g)
    return images.to(DEVICE), mask.to(DEVICE)


def _loss_and_grads(model, images, mask, run=None):
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(images, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, loss_rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=loss_rtol, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_fused_blocks_and_shifts_occur():
    model = _model("fused")
    blocks = [m for m in model.modules() if isinstance(m, FusedSwinTransformerBlock)]
    assert len(blocks) == 8 and all(type(m) is FusedSwinTransformerBlock for m in blocks)
    assert [b.shift_size for b in blocks[:2]] == [(0, 0), (2, 2)]
    assert [b.window_size for b in blocks[2::2]] == [(4, 4), (2, 2), (1, 1)]
    assert not any(isinstance(m, FusedSwinTransformerBlock) for m in _model("timm").modules())


def test_fused_matches_timm_loss_and_grads():
    images, mask = _batch(b=1)
    fused, timm = _model("fused"), _model("timm")
    _assert_same(_loss_and_grads(fused, images, mask), _loss_and_grads(timm, images, mask))


def test_state_dict_loads_across():
    fused, timm = _model("fused"), _model("timm")
    sd_f, sd_t = fused.state_dict(), timm.state_dict()
    assert sd_f.keys() == sd_t.keys()
    for k in sd_t:
        assert torch.equal(sd_f[k], sd_t[k]), k
    torch.manual_seed(1)
    other = SimMIM.from_config(_cfg("fused")).to(DEVICE)
    other.load_state_dict(sd_t, strict=True)
    SimMIM.from_config(_cfg("timm")).to(DEVICE).load_state_dict(other.state_dict(), strict=True)


def test_unfusable_map_keeps_timm_path(monkeypatch):
    """A map that is not a multiple of the window (timm pads it) runs timm's own path."""
    calls = []
    monkeypatch.setattr(sys.modules[FusedSwinTransformerBlock.__module__], "window_attention",
                        lambda *a, **k: calls.append(1))
    model = _model("fused")
    block = next(m for m in model.modules() if isinstance(m, FusedSwinTransformerBlock))
    x = torch.randn(1, 6, 6, block.dim, device=DEVICE)   # window 4 does not divide 6
    expected = super(FusedSwinTransformerBlock, block)._attn(x)
    torch.testing.assert_close(block._attn(x), expected, rtol=0, atol=0)
    assert not calls


def test_compiled_fused_model_matches_eager():
    """Two stages (shifted windows, then one window) keep dynamo's tracing time down."""
    images, mask = _batch(b=1, seed=1)
    model = _model("fused", stages=2)
    eager = _loss_and_grads(model, images, mask)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _loss_and_grads(model, images, mask, run=torch.compile(model, backend="aot_eager", fullgraph=True))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    _assert_same(compiled, eager, loss_rtol=1e-6)


@SLOW
def test_inductor_fused_model_matches_eager():
    images, mask = _batch(b=1, seed=2)
    model = _model("fused")
    eager = _loss_and_grads(model, images, mask)
    torch._dynamo.reset()
    compiled = _loss_and_grads(model, images, mask, run=torch.compile(model, fullgraph=True))
    # inductor's own kernels for the rest of the model round differently from eager on the CPU
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=0)
