"""simmim_fast.kernels: fused ops for masked image modeling, usable on their own.

Imports nothing from simmim_fast, timm, DeepSpeed or DALI. Each op has a plain-PyTorch
reference of the exact formula in ``simmim_fast.kernels.reference``.
"""
from . import reference

__all__ = ["mask_token_substitute", "masked_l1_loss", "reference"]


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' (no fused kernels in this build), got {backend!r}")


def mask_token_substitute(x, mask, mask_token, backend: str = "auto"):
    _check_backend(backend)
    return reference.mask_token_substitute(x, mask, mask_token)


def masked_l1_loss(pred, target, mask, patch_size, eps: float = 1e-5, backend: str = "auto"):
    _check_backend(backend)
    return reference.masked_l1_loss(pred, target, mask, patch_size, eps)
