"""Fused ops vs the plain-PyTorch reference (eager and torch.compile), forward + backward.

    pytest benchmarks/                       # CPU: tiny sizes, only checks that the suite runs
    bash benchmarks/gpu_all.sh OUT           # GPU: full SimMIM sizes (B = 128), tables in OUT/perf.md

Each call is one forward and one backward (torch.autograd.grad, so no .grad accumulation pass).
GB/s are against the minimum bytes: every input read once, every output written once.
"""
import pytest
import torch

from _device import COMPILE_BACKEND, DEVICE, ON_GPU, sync_timer
from simmim_fast.kernels import mask_token_substitute, masked_l1_loss
from simmim_fast.kernels import reference as ref

# name -> (x shape, dtype): the mask-token substitution right after patch embedding
SUBSTITUTE_CASES = {
    "swin_b 48x48x128 bf16": ((128, 48, 48, 128), torch.bfloat16),
    "swin_l 48x48x192 bf16": ((128, 48, 48, 192), torch.bfloat16),
    "vit_b 196x768 bf16": ((128, 196, 768), torch.bfloat16),
    "swin_b 48x48x128 fp32": ((128, 48, 48, 128), torch.float32),
} if ON_GPU else {"tiny 6x6x32 bf16": ((2, 6, 6, 32), torch.bfloat16)}

# name -> (B, image, patch, pred dtype, pixel_shuffle): the loss on the head output
L1_CASES = {
    "swin 3x192x192 p4 bf16": (128, 192, 4, torch.bfloat16, 1),
    "swin 3x192x192 p4 bf16 unshuffled": (128, 192, 4, torch.bfloat16, 32),
    "vit 3x224x224 p16 bf16": (128, 224, 16, torch.bfloat16, 1),
    "swin 3x192x192 p4 fp32": (128, 192, 4, torch.float32, 1),
} if ON_GPU else {"tiny 3x24x24 p4 bf16": (2, 24, 4, torch.bfloat16, 1),
                  "tiny 3x24x24 p4 bf16 unshuffled": (2, 24, 4, torch.bfloat16, 8)}

VARIANTS = ["fused", "reference", "compiled_ref"] + (["fused_cudagraph"] if ON_GPU else [])
ROUNDS = dict(rounds=20, iterations=10, warmup_rounds=3) if ON_GPU else dict(rounds=2, iterations=1, warmup_rounds=1)


def _cuda_graphed(step):
    """Replay ``step`` from a CUDA graph: the GPU time without Python / launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _run(benchmark, results, case, variant, order, step, min_bytes):
    if variant == "fused_cudagraph":
        step = _cuda_graphed(step)
    benchmark.group = case
    benchmark.extra_info["min_bytes"] = min_bytes
    benchmark.pedantic(step, **ROUNDS)
    t = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = min_bytes / t / 1e9
    results[(case, variant)] = dict(suite="kernels", time_s=t, min_bytes=min_bytes, order=order)


def _substitute_fn(variant):
    if variant == "reference":
        return ref.mask_token_substitute
    if variant == "compiled_ref":
        torch._dynamo.reset()
        return torch.compile(ref.mask_token_substitute, backend=COMPILE_BACKEND)
    return lambda x, m, t: mask_token_substitute(x, m, t, backend="triton")


@pytest.mark.benchmark(timer=sync_timer)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SUBSTITUTE_CASES))
def test_mask_token_substitute(benchmark, results, case, variant):
    shape, dtype = SUBSTITUTE_CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=g).to(dtype).requires_grad_()
    mask = torch.rand(shape[:-1], device=DEVICE, generator=g) < 0.6
    token = (torch.randn(shape[-1], device=DEVICE, generator=g) * 0.02).requires_grad_()
    grad_out = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    fn = _substitute_fn(variant)

    def step():
        out = fn(x, mask, token)
        return torch.autograd.grad(out, (x, token), grad_out)

    grad_x, grad_token = step()
    if variant != "reference":  # a fast wrong answer is no result
        want = torch.autograd.grad(ref.mask_token_substitute(x, mask, token), (x, token), grad_out)
        torch.testing.assert_close(grad_x, want[0])
        torch.testing.assert_close(grad_token, want[1], rtol=1e-2, atol=1e-2 * want[1].abs().max().item())
    x_bytes = x.numel() * x.element_size()
    min_bytes = 4 * x_bytes + mask.numel() * mask.element_size() + 2 * token.numel() * token.element_size()
    _run(benchmark, results, case, variant, VARIANTS.index(variant), step, min_bytes)


def _l1_fn(variant, shuffle):
    def reference(pred, target, mask, p):
        if shuffle > 1:
            pred = torch.nn.functional.pixel_shuffle(pred, shuffle)
        return ref.masked_l1_loss(pred, target, mask, p)

    if variant == "reference":
        return reference
    if variant == "compiled_ref":
        torch._dynamo.reset()
        return torch.compile(reference, backend=COMPILE_BACKEND)
    return lambda pred, target, mask, p: masked_l1_loss(pred, target, mask, p, backend="triton", pixel_shuffle=shuffle)


@pytest.mark.benchmark(timer=sync_timer)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(L1_CASES))
def test_masked_l1_loss(benchmark, results, case, variant):
    b, size, p, dtype, shuffle = L1_CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    pred_shape = (b, 3 * shuffle * shuffle, size // shuffle, size // shuffle)
    pred = torch.randn(pred_shape, device=DEVICE, generator=g).to(dtype).requires_grad_()
    target = torch.randn(b, 3, size, size, device=DEVICE, generator=g)   # the normalised images, fp32
    mask = torch.rand(b, size // p, size // p, device=DEVICE, generator=g) < 0.6
    fn = _l1_fn(variant, shuffle)

    def step():
        return torch.autograd.grad(fn(pred, target, mask, p), pred)

    (grad,) = step()
    if variant != "reference":
        (want,) = torch.autograd.grad(_l1_fn("reference", shuffle)(pred, target, mask, p), pred)
        torch.testing.assert_close(grad, want)
    min_bytes = (2 * pred.numel() * pred.element_size() + target.numel() * target.element_size()
                 + mask.numel() * mask.element_size())
    _run(benchmark, results, case, variant, VARIANTS.index(variant), step, min_bytes)
