"""simmim_kernels: fused ops for masked image modeling, usable on their own.

    from simmim_kernels import mask_token_substitute, masked_l1_loss
    x = mask_token_substitute(x, mask, mask_token)              # x (B, H, W, C), mask (B, H, W)
    loss = masked_l1_loss(pred, images, mask, patch_size=4)     # pred/images (B, 3, H, W)
    out = window_attention(qkv, bias, num_heads, window_size, shift_size)  # Swin block attention

Each op takes ``backend="auto"`` (fused Triton kernels for CUDA tensors, the reference elsewhere),
``"triton"`` or ``"torch"``. Imports nothing from simmim_fast, timm, DeepSpeed or DALI. Each op has
a plain-PyTorch reference of the exact formula in ``simmim_kernels.reference``.
"""
from . import reference
from ._utils import TRITON_IMPORT_ERROR

__all__ = ["mask_token_substitute", "masked_l1_loss", "window_attention", "reference"]

if TRITON_IMPORT_ERROR is None:
    from .mask_substitute import mask_token_substitute
    from .masked_l1 import masked_l1_loss
    from .window_attention import window_attention
else:  # no triton in this torch build: the same API, and backend="triton" says why it cannot run
    from ._utils import choose_backend as _choose_backend

    def mask_token_substitute(x, mask, mask_token, backend: str = "auto"):
        reference.check_substitute_args(x, mask, mask_token)
        _choose_backend("mask_token_substitute", backend, (x, mask, mask_token), (x, mask_token), None)
        return reference.mask_token_substitute(x, mask, mask_token)

    def masked_l1_loss(pred, target, mask, patch_size, eps: float = 1e-5, backend: str = "auto", *,
                       pixel_shuffle: int = 1):
        import torch.nn.functional as F
        if pixel_shuffle != 1:
            pred = F.pixel_shuffle(pred, pixel_shuffle)
        reference.check_l1_args(pred, target, mask, patch_size)
        _choose_backend("masked_l1_loss", backend, (pred, target, mask), (pred, target), None)
        return reference.masked_l1_loss(pred, target, mask, patch_size, eps)

    def window_attention(qkv, bias, num_heads, window_size, shift_size, scale=None, backend: str = "auto"):
        reference.check_window_attention_args(qkv, bias, num_heads, window_size, shift_size, scale)
        _choose_backend("window_attention", backend, (qkv, bias), (qkv, bias), None)
        return reference.window_attention(qkv, bias, num_heads, window_size, shift_size, scale)
