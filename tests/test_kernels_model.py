"""The SimMIM model on the fused ops (interpreted on the CPU) gives the reference's loss and gradients."""
import pytest
import torch

from simmim_fast import BatchMaskGenerator, SimMIM
from simmim_fast.kernels import _utils, mask_substitute

from helpers import tiny_swin_config, tiny_vit_config

if _utils.TRITON_IMPORT_ERROR is not None or not (
        _utils.triton_interpreted(mask_substitute._mask_substitute_fwd_kernel) or torch.cuda.is_available()):
    pytest.skip("the Triton kernels cannot run here", allow_module_level=True)
DEVICE = "cpu" if _utils.triton_interpreted(mask_substitute._mask_substitute_fwd_kernel) else "cuda"
# On a GPU the surrounding ops (cuDNN convolutions, atomics in some backward kernels) need not be
# bitwise reproducible from run to run, so the two runs may differ a little outside the fused ops.
GRAD_RTOL, GRAD_ATOL = (1e-5, 1e-7) if DEVICE == "cpu" else (1e-4, 1e-6)


def _batch(cfg, b, seed):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    images = torch.randn(b, 3, s, s, generator=g)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio)(b, generator=g)
    return images.to(DEVICE), mask.to(DEVICE)


def _loss_and_grads(make, backend, images, mask):
    torch.manual_seed(0)  # same initial weights for every backend
    model = SimMIM.from_config(make(ops_backend=backend)).to(DEVICE)
    loss = model(images, mask)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
@pytest.mark.parametrize("b", [1, 3])
def test_model_fused_matches_reference(make, b):
    images, mask = _batch(make(), b, seed=b)
    loss_t, grads_t = _loss_and_grads(make, "triton", images, mask)
    loss_r, grads_r = _loss_and_grads(make, "torch", images, mask)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-6, atol=0)
    assert grads_t.keys() == grads_r.keys() and "mask_token" in grads_t
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    assert grads_t["mask_token"].abs().sum() > 0
