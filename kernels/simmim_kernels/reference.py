"""Plain-PyTorch references for the SimMIM ops, exactly the formulas of the method.

These are the ground truth every fused kernel in this package is tested against, and the
fallback used where Triton cannot run. They import nothing but torch.

- ``mask_token_substitute``: x * (1 - w) + mask_token * w, w = mask as x's dtype.
- ``masked_l1_loss``: sum(|pred - target| * m) / (sum(m) + eps) / C, with m the token mask
  repeated ``patch_size`` times on both spatial axes (the pixel mask, shape (B, 1, H, W)).
- ``window_attention`` (also ``window_attention_reference``): Swin's (shifted-)window multi-head
  attention between the qkv and output projections: cyclic shift, window partition,
  softmax(q k^T * scale + bias + shift mask) v, window reverse, reverse shift.
"""
from __future__ import annotations

import torch

__all__ = ["mask_token_substitute", "masked_l1_loss", "check_substitute_args", "check_l1_args",
           "window_attention", "window_attention_reference", "check_window_attention_args", "shift_window_mask"]


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


def check_window_attention_args(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, window_size: int,
                                shift_size: int, scale) -> None:
    """Validate the arguments of ``window_attention``; raise ValueError naming the problem."""
    op = "window_attention"
    for name, t in (("qkv", qkv), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, v in (("num_heads", num_heads), ("window_size", window_size), ("shift_size", shift_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{op}: {name} must be an int, got {v!r}")
    if num_heads < 1 or window_size < 1:
        raise ValueError(f"{op}: num_heads and window_size must be positive, got {num_heads} and {window_size}")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"{op}: shift_size must be in [0, window_size = {window_size}), got {shift_size}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"{op}: scale must be None or a positive float, got {scale!r}")
    if not qkv.is_floating_point():
        raise ValueError(f"{op}: qkv must be floating point, got dtype {qkv.dtype}")
    if not bias.is_floating_point():
        raise ValueError(f"{op}: bias must be floating point, got dtype {bias.dtype}")
    if qkv.dim() != 4 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{op}: qkv must be channels-last (B, H, W, 3 * C) with C divisible by num_heads = "
                         f"{num_heads}, got shape {_shape(qkv)}")
    _, h, w, _ = qkv.shape
    if h % window_size or w % window_size:
        raise ValueError(f"{op}: the map's H and W ({h}, {w}) must be multiples of window_size {window_size} "
                         f"(pad the map, or use the unfused path, for other sizes)")
    n = window_size * window_size
    if tuple(bias.shape) not in ((num_heads, n, n), (1, num_heads, n, n)):
        raise ValueError(f"{op}: bias must be the gathered relative position bias (num_heads, N, N) or "
                         f"(1, num_heads, N, N) with N = window_size**2 = {n}, i.e. ({num_heads}, {n}, {n}); "
                         f"got shape {_shape(bias)}")
    if qkv.device != bias.device:
        raise ValueError(f"{op}: qkv is on {qkv.device} but bias on {bias.device}")


def shift_window_mask(height: int, width: int, window_size: int, shift_size: int,
                      device=None) -> torch.Tensor:
    """The shifted-window attention mask, (num_windows, N, N) fp32: 0 between tokens of the same
    region of the shifted map, -100 between different regions.

    Regions as in the official Swin code: along each axis three slices of the shifted map,
    [0, L - window), [L - window, L - shift), [L - shift, L); nine regions in all. Windows are
    numbered row-major over the shifted map, tokens row-major within a window.
    """
    img = torch.zeros(height, width, device=device)
    label = 0
    for ys in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
        for xs in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
            img[ys, xs] = label
            label += 1
    windows = img.view(height // window_size, window_size, width // window_size, window_size)
    windows = windows.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.where(diff != 0, -100.0, 0.0)


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, window_size: int,
                     shift_size: int, scale=None) -> torch.Tensor:
    """Swin (shifted-)window attention between the projections, computed in fp32.

    Args:
        qkv: (B, H, W, 3 * C) channels-last, a Swin block's qkv Linear applied to the normed map
            before any shift (a per-token Linear commutes with the shift and the partition); each
            token's 3 * C values laid out as (3, num_heads, head_dim), as timm's and the official
            ``qkv.reshape(B_, N, 3, num_heads, head_dim)`` read them. H, W multiples of window_size.
        bias: relative position bias gathered from the table, (num_heads, N, N) or
            (1, num_heads, N, N), N = window_size**2; fp32 or any float dtype.
        num_heads, window_size: as in the block.
        shift_size: 0, or the cyclic shift of the shifted-window block (0 < shift < window_size).
        scale: multiplies q k^T; None = head_dim ** -0.5.
    Returns:
        (B, H, W, C) in qkv's dtype: per window and head softmax(q k^T * scale + bias + mask) v,
        mask = ``shift_window_mask`` when shift_size > 0, put back in the un-shifted layout.
    """
    check_window_attention_args(qkv, bias, num_heads, window_size, shift_size, scale)
    b, h, w, c3 = qkv.shape
    c, ws, s = c3 // 3, window_size, shift_size
    head_dim, n = c // num_heads, window_size * window_size
    n_wh, n_ww = h // ws, w // ws
    scale = head_dim ** -0.5 if scale is None else float(scale)
    x = qkv.float()
    if s:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
    # (B, nWh, ws, nWw, ws, 3, heads, hd) -> (3, B * nW, heads, N, hd)
    x = x.reshape(b, n_wh, ws, n_ww, ws, 3, num_heads, head_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, b * n_wh * n_ww, num_heads, n, head_dim).unbind(0)
    attn = (q @ k.transpose(-2, -1)) * scale + bias.float().reshape(1, num_heads, n, n)
    if s:
        mask = shift_window_mask(h, w, ws, s, device=qkv.device)
        attn = (attn.view(b, n_wh * n_ww, num_heads, n, n) + mask.view(1, n_wh * n_ww, 1, n, n)).view_as(attn)
    out = attn.softmax(dim=-1) @ v                                      # (B * nW, heads, N, hd)
    out = out.view(b, n_wh, n_ww, num_heads, ws, ws, head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, h, w, c)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    return out.to(qkv.dtype)


window_attention_reference = window_attention
