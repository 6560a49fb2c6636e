"""Plain-PyTorch references for the SimMIM ops, exactly the formulas of the method.

These are the ground truth every fused kernel in this package is tested against, and the
fallback used where Triton cannot run. They import nothing but torch.

- ``mask_token_substitute``: x * (1 - w) + mask_token * w, w = mask as x's dtype.
- ``masked_l1_loss``: sum(|pred - target| * m) / (sum(m) + eps) / C, with m the token mask
  repeated ``patch_size`` times on both spatial axes (the pixel mask, shape (B, 1, H, W)).
"""
from __future__ import annotations

import torch

__all__ = ["mask_token_substitute", "masked_l1_loss", "check_substitute_args", "check_l1_args"]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_substitute_args(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> None:
    """Validate the arguments of ``mask_token_substitute``; raise ValueError naming the problem."""
    for name, t in (("x", x), ("mask", mask), ("mask_token", mask_token)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mask_token_substitute: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"mask_token_substitute: x must be a floating-point tensor, got dtype {x.dtype}")
    if not mask_token.is_floating_point():
        raise ValueError(f"mask_token_substitute: mask_token must be floating point, got dtype {mask_token.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask_token_substitute: mask must be bool, integer or float, got dtype {mask.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"mask_token_substitute: x must be channels-last (B, H, W, C) or (B, L, C), got shape {_shape(x)}")
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask_token_substitute: mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
            f"got mask {_shape(mask)} for x {_shape(x)}")
    c = x.shape[-1]
    if mask_token.numel() != c or mask_token.dim() > 1 and any(s != 1 for s in mask_token.shape[:-1]):
        raise ValueError(
            f"mask_token_substitute: mask_token must hold C = {c} values (shape ({c},) or (1, 1, {c})), "
            f"got shape {_shape(mask_token)}")
    devices = {t.device for t in (x, mask, mask_token)}
    if len(devices) != 1:
        raise ValueError(
            f"mask_token_substitute: tensors are on different devices: x on {x.device}, mask on {mask.device}, "
            f"mask_token on {mask_token.device}")


def mask_token_substitute(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace masked positions of ``x`` by ``mask_token``: ``x * (1 - w) + mask_token * w``.

    Args:
        x: channels-last features, (B, H, W, C) or (B, L, C), floating point.
        mask: (B, H, W) or (B, L), bool / integer / float; 1 (or True) = masked. Float masks blend.
        mask_token: (C,) (any leading singleton dims allowed), any floating dtype.
    Returns:
        Tensor of x's shape and dtype.
    """
    check_substitute_args(x, mask, mask_token)
    w = mask.unsqueeze(-1).to(x.dtype)
    return x * (1 - w) + mask_token.reshape(-1).to(x.dtype) * w


def check_l1_args(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
    """Validate the arguments of ``masked_l1_loss``; raise ValueError naming the problem."""
    for name, t in (("pred", pred), ("target", target), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"masked_l1_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"masked_l1_loss: patch_size must be a positive int, got {patch_size!r}")
    if not pred.is_floating_point():
        raise ValueError(f"masked_l1_loss: pred must be floating point, got dtype {pred.dtype}")
    if not target.is_floating_point():
        raise ValueError(f"masked_l1_loss: target must be floating point, got dtype {target.dtype}")
    if mask.is_complex():
        raise ValueError(f"masked_l1_loss: mask must be bool, integer or float, got dtype {mask.dtype}")
    if pred.dim() != 4:
        raise ValueError(f"masked_l1_loss: pred must be (B, C, H, W), got shape {_shape(pred)}")
    if target.shape != pred.shape:
        raise ValueError(
            f"masked_l1_loss: target must have pred's shape {_shape(pred)}, got target {_shape(target)}")
    b, _, h, w = pred.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"masked_l1_loss: pred's H and W ({h}, {w}) must be divisible by patch_size {patch_size}")
    want = (b, h // patch_size, w // patch_size)
    if tuple(mask.shape) != want:
        raise ValueError(
            f"masked_l1_loss: mask must be the token-level mask of shape (B, H/patch_size, W/patch_size) = "
            f"{want}, got mask {_shape(mask)} for pred {_shape(pred)} and patch_size {patch_size}")
    devices = {t.device for t in (pred, target, mask)}
    if len(devices) != 1:
        raise ValueError(
            f"masked_l1_loss: tensors are on different devices: pred on {pred.device}, target on "
            f"{target.device}, mask on {mask.device}")


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   eps: float = 1e-5) -> torch.Tensor:
    """SimMIM reconstruction loss: mean L1 over masked pixels, per channel.

    ``sum(|pred - target| * m) / (sum(m) + eps) / C`` where ``m`` (B, 1, H, W) is ``mask``
    repeated ``patch_size`` times along H and W. Computed in fp32; returns a 0-dim fp32 tensor.

    Args:
        pred, target: (B, C, H, W), floating point, same shape.
        mask: token-level mask (B, H / patch_size, W / patch_size), bool / integer / float.
        patch_size: pixels per mask token along each axis (the model patch size).
        eps: added to the mask sum, as the method does.
    """
    check_l1_args(pred, target, mask, patch_size)
    m = mask.to(torch.float32).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    err = (pred.float() - target.float()).abs()
    return (err * m).sum() / (m.sum() + eps) / pred.shape[1]
