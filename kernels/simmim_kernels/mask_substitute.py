"""Fused mask-token substitution: out = x * (1 - w) + mask_token * w, w = mask as x's dtype.

x is channels-last, viewed as a (rows, C) matrix with rows = B*H*W (or B*L); the mask is one
value per row. Forward: one pass over x. Backward: one pass over the incoming gradient g that
writes grad_x = g * (1 - w) and per-program fp32 partial sums of g * w (a (programs, C) buffer),
then a second tiny kernel sums the partials into grad_token. Both stages have a fixed reduction
order set by the shapes alone, so grad_token is bitwise reproducible (no atomics).

Rounding follows the reference step by step: every product and sum that the reference computes in
x's dtype is rounded to x's dtype here too (the arithmetic itself runs in fp32, or fp64 for fp64
inputs), so out and grad_x equal the reference's bit for bit (checked on the CPU; on a GPU an fp32
multiply-add may be fused, which can move a float-mask blend by an ulp). grad_token is the
exception: it is accumulated in fp32 and rounded once, to the token's dtype.

Values the result cannot depend on are not read: where w == 1 the output is the token, so x is
not loaded there (the reference would turn an inf/NaN there into NaN, this kernel gives the token).
"""
import torch
import triton
import triton.language as tl

from . import _utils
from ._triton_helpers import cast
from .reference import check_substitute_args, mask_token_substitute as _reference

__all__ = ["mask_token_substitute", "MaskTokenSubstituteFunction"]

# Tile shape heuristics (module constants so that tests can shrink them to get many programs and
# ragged edges out of tiny tensors).
MAX_BLOCK_COLS = 256        # channels per program; C above this is split over programs
BLOCK_ELEMENTS = 4096       # elements of x per program and loop step
BWD_TARGET_PROGRAMS = 1024  # backward: about this many programs, each looping over row blocks


@triton.jit
def _load_weight(mask_ptr, offsets, ok, x_dtype: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                 MASK_IS_INT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """w = mask.to(x.dtype), widened to COMPUTE_DTYPE. Integer masks go through COMPUTE_DTYPE
    first (exact for any sane mask value): the interpreter turns int -> bf16 into zeros."""
    m = tl.load(mask_ptr + offsets, mask=ok, other=0)
    if MASK_IS_INT:
        m = m.to(COMPUTE_DTYPE)
    return cast(m, x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)


@triton.jit
def _mask_substitute_fwd_kernel(
    x_ptr, mask_ptr, token_ptr, out_ptr,
    n_rows, n_cols, stride_x_row, stride_x_col, stride_mask, stride_token,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    MASK_IS_INT: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    x_dtype = out_ptr.dtype.element_ty
    # w = mask.to(x.dtype); token.to(x.dtype): round to x's dtype first, as the reference does.
    w = _load_weight(mask_ptr, rows * stride_mask, row_ok, x_dtype, COMPUTE_DTYPE, MASK_IS_INT, EMULATE_RNE)
    token = cast(tl.load(token_ptr + cols * stride_token, mask=col_ok, other=0), x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)
    keep = cast(1 - w, x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)
    # Rows that are fully masked (w == 1) take the token alone: x is not read there.
    x_ok = (row_ok & (w != 1))[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=x_ok, other=0)
    kept = cast(x.to(COMPUTE_DTYPE) * keep[:, None], x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)
    inserted = cast(token[None, :] * w[:, None], x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)
    out = cast(kept + inserted, x_dtype, EMULATE_RNE)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mask_substitute_bwd_kernel(
    grad_out_ptr, mask_ptr, grad_x_ptr, token_partial_ptr,
    n_rows, n_cols, stride_g_row, stride_g_col, stride_mask, row_blocks_per_program,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    MASK_IS_INT: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    pid_rows = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    x_dtype = grad_x_ptr.dtype.element_ty
    token_grad = tl.zeros((BLOCK_COLS,), dtype=COMPUTE_DTYPE)
    first_row = pid_rows.to(tl.int64) * row_blocks_per_program * BLOCK_ROWS
    for step in range(0, row_blocks_per_program):
        rows = first_row + step * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        w = _load_weight(mask_ptr, rows * stride_mask, row_ok, x_dtype, COMPUTE_DTYPE, MASK_IS_INT, EMULATE_RNE)
        keep = cast(1 - w, x_dtype, EMULATE_RNE).to(COMPUTE_DTYPE)
        g = tl.load(grad_out_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=ok, other=0)
        g = g.to(COMPUTE_DTYPE)
        grad_x = cast(g * keep[:, None], x_dtype, EMULATE_RNE)
        tl.store(grad_x_ptr + rows[:, None] * n_cols + cols[None, :], grad_x, mask=ok)
        # Out-of-range rows and columns load g = 0 and add nothing.
        token_grad += tl.sum(g * w[:, None], axis=0)
    tl.store(token_partial_ptr + pid_rows * n_cols + cols, token_grad, mask=col_ok)


@triton.jit
def _sum_rows_kernel(
    partial_ptr, out_ptr, n_partials, n_cols,
    BLOCK_PARTIALS: tl.constexpr, BLOCK_COLS: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """out[c] = sum_i partial[i, c] in the partials' dtype, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_PARTIALS, BLOCK_COLS), dtype=partial_ptr.dtype.element_ty)
    for start in range(0, n_partials, BLOCK_PARTIALS):
        rows = start + tl.arange(0, BLOCK_PARTIALS)
        ok = (rows < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=ok, other=0)
    tl.store(out_ptr + cols, cast(tl.sum(acc, axis=0), out_ptr.dtype.element_ty, EMULATE_RNE), mask=col_ok)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiles(n_cols: int):
    block_cols = min(_utils.next_power_of_2(n_cols), MAX_BLOCK_COLS)
    block_rows = max(1, BLOCK_ELEMENTS // block_cols)
    return block_rows, block_cols


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> (rows, C), a view whenever the strides allow one (else a copy)."""
    return x.reshape(-1, x.shape[-1])


def _mask_rows(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.reshape(-1)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def mask_token_substitute_fwd(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    mask1 = _mask_rows(mask)
    token = mask_token.reshape(-1)
    out = _utils.alloc(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_rows, block_cols = _tiles(n_cols)
    grid = (_utils.cdiv(n_rows, block_rows), _utils.cdiv(n_cols, block_cols))
    _mask_substitute_fwd_kernel[grid](
        x2, mask1, token, out, n_rows, n_cols, x2.stride(0), x2.stride(1), mask1.stride(0), token.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, COMPUTE_DTYPE=_compute_dtype(x.dtype),
        MASK_IS_INT=not mask.is_floating_point(), EMULATE_RNE=_utils.triton_interpreted(_mask_substitute_fwd_kernel))
    return out


def mask_token_substitute_bwd(grad_out: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor):
    """-> (grad_x like grad_out, grad_token like mask_token)."""
    g2 = _as_rows(grad_out)
    n_rows, n_cols = g2.shape
    mask1 = _mask_rows(mask)
    grad_x = _utils.alloc(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    grad_token = _utils.alloc(mask_token.shape, dtype=mask_token.dtype, device=mask_token.device)
    if n_rows == 0:
        grad_token.zero_()
        return grad_x, grad_token
    block_rows, block_cols = _tiles(n_cols)
    col_programs = _utils.cdiv(n_cols, block_cols)
    row_blocks = _utils.cdiv(n_rows, block_rows)
    # Each program loops over a fixed run of row blocks, so the partial buffer stays small; the
    # run length depends on the shapes only, which keeps the summation order reproducible.
    row_programs = min(row_blocks, max(1, BWD_TARGET_PROGRAMS // col_programs))
    blocks_per_program = _utils.cdiv(row_blocks, row_programs)
    row_programs = _utils.cdiv(row_blocks, blocks_per_program)
    compute_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    partials = _utils.alloc((row_programs, n_cols), dtype=compute_dtype, device=grad_out.device)
    _mask_substitute_bwd_kernel[(row_programs, col_programs)](
        g2, mask1, grad_x, partials, n_rows, n_cols, g2.stride(0), g2.stride(1), mask1.stride(0), blocks_per_program,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, COMPUTE_DTYPE=_compute_dtype(grad_out.dtype),
        MASK_IS_INT=not mask.is_floating_point(), EMULATE_RNE=_utils.triton_interpreted(_mask_substitute_bwd_kernel))
    sum_cols = min(_utils.next_power_of_2(n_cols), 128)
    sum_rows = max(1, min(_utils.next_power_of_2(row_programs), 4096 // sum_cols))
    _sum_rows_kernel[(_utils.cdiv(n_cols, sum_cols),)](
        partials, grad_token, row_programs, n_cols, BLOCK_PARTIALS=sum_rows, BLOCK_COLS=sum_cols,
        EMULATE_RNE=_utils.triton_interpreted(_sum_rows_kernel))
    return grad_x, grad_token


# torch.compile sees these two as opaque ops (with fake kernels for shape propagation), so the
# autograd.Function below traces without graph breaks and the kernels run as they are.
@torch.library.custom_op("simmim_kernels::mask_token_substitute_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    return mask_token_substitute_fwd(x, mask, mask_token)


@_fwd_op.register_fake
def _(x, mask, mask_token):
    return x.new_empty(x.shape)


@torch.library.custom_op("simmim_kernels::mask_token_substitute_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_token_substitute_bwd(grad_out, mask, mask_token)


@_bwd_op.register_fake
def _(grad_out, mask, mask_token):
    return grad_out.new_empty(grad_out.shape), mask_token.new_empty(mask_token.shape)


class MaskTokenSubstituteFunction(torch.autograd.Function):
    """Fused forward and backward; the mask gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask, mask_token)
        fwd = mask_token_substitute_fwd if _utils.plain_eager(x, mask, mask_token) else _fwd_op
        return fwd(x, mask, mask_token)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        mask, mask_token = ctx.saved_tensors
        bwd = mask_token_substitute_bwd if _utils.plain_eager(grad_out, mask, mask_token) else _bwd_op
        grad_x, grad_token = bwd(grad_out, mask, mask_token)
        return (grad_x if ctx.needs_input_grad[0] else None, None,
                grad_token if ctx.needs_input_grad[2] else None)


def mask_token_substitute(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                          backend: str = "auto") -> torch.Tensor:
    """``x * (1 - w) + mask_token * w`` with ``w = mask`` as x's dtype, fused forward and backward.

    Args:
        x: channels-last features (B, H, W, C) or (B, L, C); fp32 / bf16 / fp16 (fp64 too).
        mask: (B, H, W) or (B, L); bool, integer or float (float masks blend). Gets no gradient on
            the Triton path (a mask that requires grad makes "auto" take the reference).
        mask_token: C values, shape (C,) or with leading singleton dims; any float dtype.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" (error if it cannot
            run), "torch" (the plain-PyTorch reference).
    Returns:
        A contiguous tensor of x's shape and dtype.
    """
    check_substitute_args(x, mask, mask_token)
    chosen = _utils.choose_backend("mask_token_substitute", backend, (x, mask, mask_token), (x, mask_token),
                                   _mask_substitute_fwd_kernel, no_grad=(mask,))
    if chosen == "torch":
        return _reference(x, mask, mask_token)
    return MaskTokenSubstituteFunction.apply(x, mask, mask_token)
