"""torch.compile traces the fused ops without graph breaks (fullgraph=True) and matches eager.

On the CPU the kernels run in Triton's interpreter inside the compiled graph: the custom ops are
opaque nodes, so inductor calls them as they are. The full SimMIM model under inductor takes
minutes on a small CPU, so that test runs only with SIMMIM_SLOW_TESTS=1 (the tests part of
benchmarks/gpu_all.sh sets it); the model under aot_eager (the same AOTAutograd tracing, no code generation) always runs.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from simmim_fast import BatchMaskGenerator, SimMIM
from simmim_fast.kernels import _utils, mask_substitute, mask_token_substitute, masked_l1_loss

from helpers import tiny_swin_config

INTERPRETED = (_utils.TRITON_IMPORT_ERROR is None
               and _utils.triton_interpreted(mask_substitute._mask_substitute_fwd_kernel))
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
# On a GPU, eager and compiled runs of the same model need not agree bitwise outside the fused ops.
GRAD_RTOL, GRAD_ATOL = (1e-5, 1e-8) if DEVICE == "cpu" else (1e-4, 1e-6)
SLOW = pytest.mark.skipif(not os.environ.get("SIMMIM_SLOW_TESTS"),
                          reason="minutes on a CPU; SIMMIM_SLOW_TESTS=1 runs it")


class TinyMIM(nn.Module):
    """Substitution -> linear -> (optionally fused) pixel shuffle -> masked L1: both ops, both directions."""

    def __init__(self, c=16, stride=4, fuse_shuffle=False):
        super().__init__()
        self.stride, self.fuse_shuffle = stride, fuse_shuffle
        self.token = nn.Parameter(torch.randn(c))
        self.proj = nn.Linear(c, 3 * stride * stride)

    def forward(self, x, mask, images):
        x = mask_token_substitute(x, mask, self.token, backend="triton")     # (B, h, w, C)
        pred = self.proj(x).permute(0, 3, 1, 2)                              # (B, 3*s*s, h, w)
        if self.fuse_shuffle:
            return masked_l1_loss(pred, images, mask, self.stride, backend="triton", pixel_shuffle=self.stride)
        return masked_l1_loss(F.pixel_shuffle(pred, self.stride), images, mask, self.stride, backend="triton")


def _inputs(seed=0, b=2, h=4, w=3, c=16, s=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, c, generator=g).to(DEVICE).requires_grad_()
    mask = (torch.rand(b, h, w, generator=g) < 0.6).to(DEVICE)
    images = torch.randn(b, 3, h * s, w * s, generator=g).to(DEVICE)
    return x, mask, images


def _run(module, x, mask, images):
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    loss = module(x, mask, images)
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-6 if DEVICE == "cpu" else 1e-5, atol=0)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=GRAD_RTOL, atol=max(GRAD_ATOL, 1e-7))


@pytest.mark.parametrize("fuse_shuffle", [False, True])
def test_fullgraph_trace_contains_the_custom_ops(fuse_shuffle):
    torch.manual_seed(0)
    module = TinyMIM(fuse_shuffle=fuse_shuffle).to(DEVICE)
    inputs = _inputs()
    eager = _run(module, *inputs)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch._dynamo.reset()
    _assert_same(_run(torch.compile(module, backend=capture, fullgraph=True), *inputs), eager)
    code = "\n".join(graphs)
    for op in ("mask_token_substitute_fwd", "mask_token_substitute_bwd", "masked_l1_fwd", "masked_l1_bwd"):
        assert f"simmim_kernels.{op}" in code, op
    torch._dynamo.reset()
    _assert_same(_run(torch.compile(module, backend="aot_eager", fullgraph=True), *inputs), eager)


def test_inductor_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = TinyMIM(fuse_shuffle=True).to(DEVICE)
    inputs = _inputs(seed=1)
    eager = _run(module, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    _assert_same(_run(compiled, *inputs), eager)
    _assert_same(_run(compiled, *_inputs(seed=2)), _run(module, *_inputs(seed=2)))  # same shapes: no recompile needed


def _model_batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(b, 3, s, s, generator=g)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio)(b, generator=g)
    return images.to(DEVICE), mask.to(DEVICE)


def _model_loss_and_grads(model, images, mask, run=None):
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(images, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_model_run(ops_backend, compile_backend, images, mask):
    torch.manual_seed(0)
    model = SimMIM.from_config(tiny_swin_config(ops_backend=ops_backend)).to(DEVICE)
    eager = _model_loss_and_grads(model, images, mask)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _model_loss_and_grads(model, images, mask, run=torch.compile(model, backend=compile_backend))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    return eager, compiled


def test_model_compiles_with_fused_ops_aot_eager():
    images, mask = _model_batch(tiny_swin_config())
    (loss_e, grads_e), (loss_c, grads_c) = _compiled_model_run("triton", "aot_eager", images, mask)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


@SLOW
def test_model_compiles_with_fused_ops_inductor():
    """Inductor: the loss matches eager; the gradients match inductor's own compile of the model on
    the reference ops. (On the CPU, inductor's gradients of this tiny Swin differ from eager by
    ~1% in the encoder with either backend: a property of the compiled model, not of these ops.)"""
    images, mask = _model_batch(tiny_swin_config())
    (loss_e, _), (loss_c, grads_c) = _compiled_model_run("triton", "inductor", images, mask)
    _, (loss_rc, grads_rc) = _compiled_model_run("torch", "inductor", images, mask)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_c, loss_rc, rtol=1e-5, atol=0)
    assert grads_c.keys() == grads_rc.keys() and "mask_token" in grads_c
    for name in grads_rc:
        torch.testing.assert_close(grads_c[name], grads_rc[name], rtol=1e-4, atol=1e-7, msg=name)
