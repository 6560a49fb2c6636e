"""Fused SimMIM loss: sum(|pred - target| * m) / (sum(m) + eps) / C, m = token mask upsampled.

The pixel mask is never materialised: each program takes a tile of pixels of one image (rows of
contiguous pixels, so that loads and stores vectorise), looks up the token mask at
(b, y // p, x // p) and loops over the C channels. Forward: per-program fp32
partial sums of |pred - target| * m and of m, then one tiny program sums the partials in a fixed
order (bitwise reproducible, no atomics) and writes the loss and the denominator
sum(m) + eps. The forward saves only its inputs and that scalar denominator. Backward, one pass:
grad_pred = ((grad_loss / C) / denom) * m * sign(pred - target), in pred's dtype (and, if target
requires grad, grad_target = -that, in target's dtype).

Pixels whose mask is exactly 0 are not read (they cannot change the loss): SimMIM masks 60% of
the image, so both passes read 40% less of pred and target. The reference's err * m would turn
an inf/NaN at such a pixel into a NaN loss; here it is ignored (and its gradient is 0).

``pixel_shuffle=s`` lets pred be the head's output before ``nn.PixelShuffle(s)``, i.e.
(B, C*s*s, H/s, W/s) with pixel (c, y, x) at channel c*s*s + (y % s)*s + x % s, row y // s,
column x // s: the loss reads it in place, so the shuffle's copy (and its backward) disappear, and
grad_pred comes back in that same un-shuffled layout.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _utils
from ._triton_helpers import cast
from .reference import check_l1_args, masked_l1_loss as _reference

__all__ = ["masked_l1_loss", "MaskedL1LossFunction"]

BLOCK_PIXELS = 1024    # pixels per program (a BLOCK_Y x BLOCK_X tile, times C channels)
MAX_BLOCK_X = 64       # tile width: runs of contiguous pixels, so loads and stores vectorise
MAX_GROUP = 16         # pixels per mask lookup (a power of two dividing patch_size)
FINAL_BLOCK = 1024     # partial sums per loop step of the final reduction


@triton.jit
def _tile(height, width, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, GROUP: tl.constexpr):
    """This program's pixels as a (BLOCK_Y, BLOCK_X // GROUP, GROUP) tile of one image.

    A group is GROUP consecutive pixels of a row; GROUP divides patch_size, so a group lies inside
    one mask token. Loading the mask once per group, shaped (BLOCK_Y, BLOCK_X // GROUP, 1), tells
    the compiler that the load predicate `mask != 0` is constant along a group, so the pixel loads
    and stores can be vectorised. Returns b, y, x, the first x of each group, in-image mask, and
    this program's index among all programs (for the partial sums)."""
    b = tl.program_id(2).to(tl.int64)
    y = (tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y))[:, None, None]
    group_x = (tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X // GROUP) * GROUP)[None, :, None]
    x = group_x + tl.arange(0, GROUP)[None, None, :]
    ok = (y < height) & (x < width)
    program = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    return b, y, x, group_x, ok, program


@triton.jit
def _sum_all(v):
    return tl.sum(tl.sum(tl.sum(v, axis=2), axis=1), axis=0)


@triton.jit
def _pixel_offsets(b, y, x, stride_b, stride_c, stride_h, stride_w, SHUFFLE: tl.constexpr):
    """Offset of channel 0 of pixel (b, y, x) and the step between channels, for a (B, C, H, W)
    tensor (SHUFFLE = 1) or its un-pixel-shuffled form (B, C*S*S, H/S, W/S)."""
    sub = (y % SHUFFLE) * SHUFFLE + x % SHUFFLE
    offs = b * stride_b + sub * stride_c + (y // SHUFFLE) * stride_h + (x // SHUFFLE) * stride_w
    return offs, stride_c * (SHUFFLE * SHUFFLE)


@triton.jit
def _load_group_mask(mask_ptr, b, y, group_x, height, width, stride_mb, stride_mh, stride_mw, PATCH: tl.constexpr,
                     ACC_DTYPE: tl.constexpr):
    """The token mask of each group, (BLOCK_Y, BLOCK_X // GROUP, 1); 0 outside the image (a group
    is inside the image iff its first pixel is, since GROUP divides W)."""
    ok = (y < height) & (group_x < width)
    m = tl.load(mask_ptr + b * stride_mb + (y // PATCH) * stride_mh + (group_x // PATCH) * stride_mw, mask=ok, other=0)
    # m = mask.to(float32), as the reference takes it (fp64 masks too)
    return m.to(tl.float32).to(ACC_DTYPE)


@triton.jit
def _masked_l1_fwd_kernel(
    pred_ptr, target_ptr, mask_ptr, partial_err_ptr, partial_mask_ptr,
    n_channels, height, width,
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_mb, stride_mh, stride_mw,
    PATCH: tl.constexpr, SHUFFLE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    GROUP: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    b, y, x, group_x, ok, program = _tile(height, width, BLOCK_Y, BLOCK_X, GROUP)
    m = _load_group_mask(mask_ptr, b, y, group_x, height, width, stride_mb, stride_mh, stride_mw, PATCH, ACC_DTYPE)
    read = ok & (m != 0)
    p_offs, p_step = _pixel_offsets(b, y, x, stride_pb, stride_pc, stride_ph, stride_pw, SHUFFLE)
    t_offs = b * stride_tb + y * stride_th + x * stride_tw
    err = tl.zeros((BLOCK_Y, BLOCK_X // GROUP, GROUP), dtype=ACC_DTYPE)
    for c in range(0, n_channels):
        p = tl.load(pred_ptr + p_offs + c * p_step, mask=read, other=0).to(ACC_DTYPE)
        t = tl.load(target_ptr + t_offs + c * stride_tc, mask=read, other=0).to(ACC_DTYPE)
        err += tl.abs(p - t)
    tl.store(partial_err_ptr + program, _sum_all(err * m))
    tl.store(partial_mask_ptr + program, _sum_all(m) * GROUP)  # m is per group of GROUP pixels


@triton.jit
def _masked_l1_finish_kernel(
    partial_err_ptr, partial_mask_ptr, loss_ptr, denom_ptr, n_partials, eps, n_channels,
    BLOCK: tl.constexpr,
):
    acc_err = tl.zeros((BLOCK,), dtype=partial_err_ptr.dtype.element_ty)
    acc_mask = tl.zeros((BLOCK,), dtype=partial_err_ptr.dtype.element_ty)
    for start in range(0, n_partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < n_partials
        acc_err += tl.load(partial_err_ptr + idx, mask=ok, other=0)
        acc_mask += tl.load(partial_mask_ptr + idx, mask=ok, other=0)
    denom = tl.sum(acc_mask, axis=0) + eps
    tl.store(denom_ptr, denom)
    tl.store(loss_ptr, tl.sum(acc_err, axis=0) / denom / n_channels)


@triton.jit
def _masked_l1_bwd_kernel(
    grad_loss_ptr, denom_ptr, pred_ptr, target_ptr, mask_ptr, grad_pred_ptr, grad_target_ptr,
    n_channels, height, width,
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_tb, stride_tc, stride_th, stride_tw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_gtb, stride_gtc, stride_gth, stride_gtw,
    stride_mb, stride_mh, stride_mw,
    PATCH: tl.constexpr, SHUFFLE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    GROUP: tl.constexpr, ACC_DTYPE: tl.constexpr, WRITE_GRAD_TARGET: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    b, y, x, group_x, ok, _ = _tile(height, width, BLOCK_Y, BLOCK_X, GROUP)
    # The reference's autograd order: (grad / C) / denom, then * m, then * sign.
    scale = tl.load(grad_loss_ptr).to(ACC_DTYPE) / n_channels / tl.load(denom_ptr).to(ACC_DTYPE)
    m = _load_group_mask(mask_ptr, b, y, group_x, height, width, stride_mb, stride_mh, stride_mw, PATCH, ACC_DTYPE)
    read = ok & (m != 0)
    scaled_m = scale * m
    p_offs, p_step = _pixel_offsets(b, y, x, stride_pb, stride_pc, stride_ph, stride_pw, SHUFFLE)
    g_offs, g_step = _pixel_offsets(b, y, x, stride_gb, stride_gc, stride_gh, stride_gw, SHUFFLE)
    t_offs = b * stride_tb + y * stride_th + x * stride_tw
    gt_offs = b * stride_gtb + y * stride_gth + x * stride_gtw
    for c in range(0, n_channels):
        p = tl.load(pred_ptr + p_offs + c * p_step, mask=read, other=0).to(ACC_DTYPE)
        t = tl.load(target_ptr + t_offs + c * stride_tc, mask=read, other=0).to(ACC_DTYPE)
        diff = p - t
        # sign(diff) as torch's abs backward has it: 0 at 0, NaN stays NaN (diff * 0).
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, diff * 0)).to(ACC_DTYPE)
        grad = scaled_m * sign
        grad_pred = cast(grad, grad_pred_ptr.dtype.element_ty, EMULATE_RNE)
        tl.store(grad_pred_ptr + g_offs + c * g_step, grad_pred, mask=ok)
        if WRITE_GRAD_TARGET:
            grad_target = cast(-grad, grad_target_ptr.dtype.element_ty, EMULATE_RNE)
            tl.store(grad_target_ptr + gt_offs + c * stride_gtc, grad_target, mask=ok)


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(target: torch.Tensor, patch_size: int):
    """(B, C, H, W) of the image, the tile (BLOCK_Y, BLOCK_X, GROUP) and the grid (x tiles, y tiles, B)."""
    b, c, h, w = target.shape
    # The widest power of two <= MAX_BLOCK_X that divides W (no idle lanes), if it is not tiny.
    block_x = min(MAX_BLOCK_X, BLOCK_PIXELS, w & -w) if w else 1
    if block_x < 16:
        block_x = min(MAX_BLOCK_X, BLOCK_PIXELS, _utils.next_power_of_2(w))
    block_y = max(1, BLOCK_PIXELS // block_x)
    # The largest power of two dividing patch_size (so also W): a group never straddles two tokens.
    group = min(patch_size & -patch_size, MAX_GROUP, block_x)
    return b, c, h, w, (block_y, block_x, group), (_utils.cdiv(w, block_x), _utils.cdiv(h, block_y), b)


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def masked_l1_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, eps: float,
                  pixel_shuffle: int):
    """-> (loss, denom), 0-dim tensors in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    b, c, h, w, (block_y, block_x, group), grid = _geometry(target, patch_size)
    acc = _acc_dtype(pred, target)
    loss = _utils.alloc((), dtype=acc, device=pred.device)
    denom = _utils.alloc((), dtype=acc, device=pred.device)
    n_partials = grid[0] * grid[1] * grid[2]
    partial_err = _utils.alloc((max(1, n_partials),), dtype=acc, device=pred.device)
    partial_mask = _utils.alloc((max(1, n_partials),), dtype=acc, device=pred.device)
    mask = _mask_view(mask)
    if n_partials:
        _masked_l1_fwd_kernel[grid](
            pred, target, mask, partial_err, partial_mask, c, h, w, *pred.stride(), *target.stride(), *mask.stride(),
            PATCH=patch_size, SHUFFLE=pixel_shuffle, BLOCK_Y=block_y, BLOCK_X=block_x, GROUP=group,
            ACC_DTYPE=_tl_dtype(acc))
    _masked_l1_finish_kernel[(1,)](partial_err, partial_mask, loss, denom, n_partials, eps, c,
                                   BLOCK=min(FINAL_BLOCK, _utils.next_power_of_2(max(1, n_partials))))
    return loss, denom


def masked_l1_bwd(grad_loss: torch.Tensor, denom: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor, patch_size: int, pixel_shuffle: int, need_grad_target: bool):
    """-> (grad_pred like pred, grad_target like target, or an empty tensor if not needed)."""
    b, c, h, w, (block_y, block_x, group), grid = _geometry(target, patch_size)
    grad_pred = _utils.alloc_like(pred)
    grad_target = _utils.alloc_like(target) if need_grad_target else target.new_empty((0,))
    mask = _mask_view(mask)
    if grid[0] * grid[1] * grid[2]:
        _masked_l1_bwd_kernel[grid](
            grad_loss, denom, pred, target, mask, grad_pred, grad_target if need_grad_target else grad_pred,
            c, h, w, *pred.stride(), *target.stride(), *grad_pred.stride(),
            *(grad_target.stride() if need_grad_target else grad_pred.stride()), *mask.stride(),
            PATCH=patch_size, SHUFFLE=pixel_shuffle, BLOCK_Y=block_y, BLOCK_X=block_x, GROUP=group,
            ACC_DTYPE=_tl_dtype(_acc_dtype(pred, target)),
            WRITE_GRAD_TARGET=need_grad_target, EMULATE_RNE=_utils.triton_interpreted(_masked_l1_bwd_kernel))
    return grad_pred, grad_target


@torch.library.custom_op("simmim_kernels::masked_l1_fwd", mutates_args=())
def _fwd_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, eps: float,
            pixel_shuffle: int) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_l1_fwd(pred, target, mask, patch_size, eps, pixel_shuffle)


@_fwd_op.register_fake
def _(pred, target, mask, patch_size, eps, pixel_shuffle):
    acc = _acc_dtype(pred, target)
    return pred.new_empty((), dtype=acc), pred.new_empty((), dtype=acc)


@torch.library.custom_op("simmim_kernels::masked_l1_bwd", mutates_args=())
def _bwd_op(grad_loss: torch.Tensor, denom: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
            mask: torch.Tensor, patch_size: int, pixel_shuffle: int,
            need_grad_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_l1_bwd(grad_loss, denom, pred, target, mask, patch_size, pixel_shuffle, need_grad_target)


@_bwd_op.register_fake
def _(grad_loss, denom, pred, target, mask, patch_size, pixel_shuffle, need_grad_target):
    return (torch.empty_like(pred), torch.empty_like(target) if need_grad_target else target.new_empty((0,)))


class MaskedL1LossFunction(torch.autograd.Function):
    """Fused forward and backward; saves the inputs and the scalar denominator; the mask gets no gradient."""

    @staticmethod
    def forward(ctx, pred, target, mask, patch_size: int, eps: float, pixel_shuffle: int):
        fwd = masked_l1_fwd if _utils.plain_eager(pred, target, mask) else _fwd_op
        loss, denom = fwd(pred, target, mask, patch_size, eps, pixel_shuffle)
        ctx.save_for_backward(pred, target, mask, denom)
        ctx.patch_size, ctx.pixel_shuffle = patch_size, pixel_shuffle
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target, mask, denom = ctx.saved_tensors
        need_target = ctx.needs_input_grad[1]
        bwd = masked_l1_bwd if _utils.plain_eager(grad_loss, pred, target, mask) else _bwd_op
        grad_pred, grad_target = bwd(grad_loss, denom, pred, target, mask, ctx.patch_size, ctx.pixel_shuffle,
                                     need_target)
        return (grad_pred if ctx.needs_input_grad[0] else None, grad_target if need_target else None,
                None, None, None, None)


def _check_shuffle(pred: torch.Tensor, target: torch.Tensor, pixel_shuffle: int) -> None:
    if isinstance(pixel_shuffle, bool) or not isinstance(pixel_shuffle, int) or pixel_shuffle < 1:
        raise ValueError(f"masked_l1_loss: pixel_shuffle must be a positive int, got {pixel_shuffle!r}")
    if pixel_shuffle == 1:
        return
    s = pixel_shuffle
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"masked_l1_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if target.dim() != 4 or target.shape[2] % s or target.shape[3] % s:
        raise ValueError(f"masked_l1_loss: with pixel_shuffle={s}, target must be (B, C, H, W) with H and W "
                         f"divisible by {s}, got target {tuple(target.shape)}")
    want = (target.shape[0], target.shape[1] * s * s, target.shape[2] // s, target.shape[3] // s)
    if tuple(pred.shape) != want:
        raise ValueError(
            f"masked_l1_loss: with pixel_shuffle={s}, pred must be the un-shuffled head output "
            f"(B, C*{s}*{s}, H/{s}, W/{s}) = {want} for target {tuple(target.shape)}, got pred {tuple(pred.shape)}")


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   eps: float = 1e-5, backend: str = "auto", *, pixel_shuffle: int = 1) -> torch.Tensor:
    """SimMIM loss ``sum(|pred - target| * m) / (sum(m) + eps) / C`` (m: ``mask`` repeated
    ``patch_size`` times along H and W), fused forward and backward, never building m.

    Args:
        pred: (B, C, H, W) fp32 / bf16 / fp16 (fp64 too); with ``pixel_shuffle=s`` the head output
            before ``nn.PixelShuffle(s)``, (B, C*s*s, H/s, W/s). Any strides.
        target: (B, C, H, W), fp32 or pred's dtype (any float dtype works). Gets a gradient if it
            requires one.
        mask: token mask (B, H/patch_size, W/patch_size), bool / integer / float. No gradient on the
            Triton path (a mask that requires grad makes "auto" take the reference).
        patch_size: pixels per mask token along each axis.
        eps: added to the mask sum.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton", "torch".
        pixel_shuffle: see ``pred``; 1 = pred is already (B, C, H, W).
    Returns:
        0-dim fp32 tensor (fp64 on the Triton path when an input is fp64).
    """
    _check_shuffle(pred, target, pixel_shuffle)
    # With pixel_shuffle the reference's checks see a free stand-in of the shuffled pred.
    check_l1_args(pred if pixel_shuffle == 1 else pred.new_empty(()).expand(target.shape), target, mask, patch_size)
    chosen = _utils.choose_backend("masked_l1_loss", backend, (pred, target, mask), (pred, target),
                                   _masked_l1_fwd_kernel, no_grad=(mask,))
    if chosen == "torch":
        return _reference(F.pixel_shuffle(pred, pixel_shuffle) if pixel_shuffle > 1 else pred, target, mask,
                          patch_size, eps)
    return MaskedL1LossFunction.apply(pred, target, mask, patch_size, float(eps), pixel_shuffle)
