"""Fused Swin (shifted-)window attention: shift, partition, softmax(q k^T * scale + bias + mask) v,
reverse and reverse shift in one kernel, forward and backward.

Input is the qkv Linear's output on the normed map, (B, H, W, 3 * C) channels-last, each token laid
out as (3, heads, head_dim). Nothing is copied: a program takes one window of the shifted map and one
head, and finds its tokens in the un-shifted map by index arithmetic: token t of window (wh, ww)
sits at row (wh * ws + t // ws + shift) mod H, column (ww * ws + t % ws + shift) mod W, which is
``torch.roll(x, -shift)`` followed by the window partition. The output is written at the same
positions, which is the window reverse followed by the reverse roll. The shifted-window mask is
computed from the same indices (the official Swin regions: three slices of the shifted map per axis,
[0, L - ws), [L - ws, L - shift), [L - shift, L); -100 between different regions, added, as the
official code adds it), never stored.

A window has N = ws * ws tokens (36 at window 6, 144 at 12); the kernels pad it to a power of two
(at least 16, for ``tl.dot``) and mask the padding. Scores, softmax and the logsumexp are fp32; the
matmul operands are the input dtype (bf16 / fp16 tensor cores, fp32 accumulation), with IEEE fp32
products for fp32 inputs (no TF32: ``input_precision="ieee"``). P and dS are rounded to the input
dtype before they multiply V, K or Q, as FlashAttention does.

Forward: grid (windows, heads, query blocks); each program holds all N keys, so the softmax is exact
in one pass; it writes the output and the logsumexp (fp32, (windows, heads, N)), which is all the
backward needs besides the inputs.

Backward, one kernel (FlashAttention style): each program takes one head and a fixed run of windows;
per window it loads K and V once, and per query block recomputes the scores from Q and K and
P = exp(S - logsumexp), then dV += P^T dO, dP = dO V^T, delta = rowsum(P * dP) (= rowsum(dO * O),
but needs no O), dS = P * (dP - delta), dQ = dS K * scale (written at once), dK += dS^T Q * scale.
d(bias) of the head is the sum of dS over all windows: each program sums its windows' dS in fp32
(in registers when the window is one query block, else in its own slice of the partial buffer), and a
second small kernel adds the programs' partials in a fixed order. No atomics: d(bias) is bitwise
reproducible for a given shape.
"""
import torch
import triton
import triton.language as tl

from . import _utils
from ._triton_helpers import cast
from .reference import check_window_attention_args, window_attention as _reference

__all__ = ["window_attention", "WindowAttentionFunction", "window_attention_fwd", "window_attention_bwd"]

# Module constants so that tests can shrink them (several query blocks, several windows per program).
MAX_BLOCK_M = 64            # query rows per program / loop step; a window of more (padded) tokens is split
LARGE_BLOCK_M = 32          # ... for windows of more than 64 (padded) tokens and for fp32 inputs, whose
                            # (query block x keys) tiles would otherwise not fit in registers (ptxas spills)
BWD_TARGET_PROGRAMS = 1024  # backward: about this many programs in all, each looping over windows
SUM_BLOCK = 1024            # d(bias) elements per program of the partial-sum kernel
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _lowp(v, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """An fp32 tile rounded to the matmul operand dtype (kept fp32 when interpreted: the CPU
    interpreter mishandles bf16 arithmetic, so it multiplies the rounded values in fp32)."""
    if EMULATE_RNE:
        return cast(v, DTYPE, EMULATE_RNE).to(tl.float32)
    else:
        return v.to(DTYPE)


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """a @ b, fp32 accumulation; fp32 operands use IEEE products (no TF32)."""
    if EMULATE_RNE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def _load_operand(ptrs, mask, EMULATE_RNE: tl.constexpr):
    v = tl.load(ptrs, mask=mask, other=0)
    if EMULATE_RNE:
        v = v.to(tl.float32)
    return v


@triton.jit
def _tokens(window, t, n_wh, n_ww, height, width, WS: tl.constexpr, SHIFT: tl.constexpr):
    """Image b and un-shifted (y, x) of tokens t of a window of the shifted map, and their
    shifted-window region label (0..8; all 0 without a shift)."""
    per_image = n_wh * n_ww
    b = window // per_image
    r = window % per_image
    ys = (r // n_ww) * WS + t // WS
    xs = (r % n_ww) * WS + t % WS
    if SHIFT > 0:
        label = (((ys >= height - WS).to(tl.int32) + (ys >= height - SHIFT).to(tl.int32)) * 3
                 + (xs >= width - WS).to(tl.int32) + (xs >= width - SHIFT).to(tl.int32))
        y = (ys + SHIFT) % height
        x = (xs + SHIFT) % width
    else:
        label = t * 0
        y = ys
        x = xs
    return b, y, x, label


@triton.jit
def _scores(q, kt, bias_ptr, head, rows, cols, row_ok, col_ok, lab_r, lab_c, scale,
            stride_bh, stride_bq, stride_bk,
            SHIFT: tl.constexpr, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """q k^T * scale + bias + shift mask, fp32; -inf in the padded key columns."""
    s = _dot(q, kt, DTYPE, EMULATE_RNE) * scale
    bias = tl.load(bias_ptr + head * stride_bh + rows[:, None] * stride_bq + cols[None, :] * stride_bk,
                   mask=row_ok[:, None] & col_ok[None, :], other=0)
    s += bias.to(tl.float32)
    if SHIFT > 0:
        s += tl.where(lab_r[:, None] != lab_c[None, :], -100.0, 0.0)
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _window_attention_fwd_kernel(
    qkv_ptr, bias_ptr, out_ptr, lse_ptr,
    n_wh, n_ww, height, width, n_channels, n_heads, scale,
    stride_b, stride_h, stride_w, stride_c,
    stride_ob, stride_oh, stride_ow, stride_oc,
    stride_bh, stride_bq, stride_bk,
    N: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    window = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    row_ok, col_ok, d_ok = rows < N, cols < N, d < HEAD_DIM
    DTYPE = qkv_ptr.dtype.element_ty
    b_r, y_r, x_r, lab_r = _tokens(window, rows, n_wh, n_ww, height, width, WS, SHIFT)
    b_c, y_c, x_c, lab_c = _tokens(window, cols, n_wh, n_ww, height, width, WS, SHIFT)
    q_tok = b_r * stride_b + y_r * stride_h + x_r * stride_w
    k_tok = b_c * stride_b + y_c * stride_h + x_c * stride_w
    ch = head * HEAD_DIM + d
    q = _load_operand(qkv_ptr + q_tok[:, None] + ch[None, :] * stride_c, row_ok[:, None] & d_ok[None, :],
                      EMULATE_RNE)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = _load_operand(qkv_ptr + k_tok[:, None] + (n_channels + ch)[None, :] * stride_c, kv_ok, EMULATE_RNE)
    v = _load_operand(qkv_ptr + k_tok[:, None] + (2 * n_channels + ch)[None, :] * stride_c, kv_ok, EMULATE_RNE)
    s = _scores(q, tl.trans(k), bias_ptr, head, rows, cols, row_ok, col_ok, lab_r, lab_c, scale,
                stride_bh, stride_bq, stride_bk, SHIFT, DTYPE, EMULATE_RNE)
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    p = p / l[:, None]
    o = _dot(_lowp(p, DTYPE, EMULATE_RNE), v, DTYPE, EMULATE_RNE)
    o_tok = b_r * stride_ob + y_r * stride_oh + x_r * stride_ow
    tl.store(out_ptr + o_tok[:, None] + ch[None, :] * stride_oc, cast(o, out_ptr.dtype.element_ty, EMULATE_RNE),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + (window * n_heads + head) * N + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def _window_attention_bwd_kernel(
    qkv_ptr, bias_ptr, dout_ptr, lse_ptr, dqkv_ptr, partial_ptr,
    n_windows, windows_per_program, n_wh, n_ww, height, width, n_channels, n_heads, scale,
    stride_b, stride_h, stride_w, stride_c,
    stride_gb, stride_gh, stride_gw, stride_gc,
    stride_db, stride_dh, stride_dw, stride_dc,
    stride_bh, stride_bq, stride_bk,
    N: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_M: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    head = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    col_ok, d_ok = cols < N, d < HEAD_DIM
    kv_ok = col_ok[:, None] & d_ok[None, :]
    ch = head * HEAD_DIM + d
    DTYPE = qkv_ptr.dtype.element_ty
    GRAD_DTYPE = dqkv_ptr.dtype.element_ty
    # This program's slice of the d(bias) partials: (N, N) fp32 at [group, head].
    partial = partial_ptr + (group.to(tl.int64) * n_heads + head) * (N * N)
    first = group.to(tl.int64) * windows_per_program
    last = tl.minimum(first + windows_per_program, n_windows)
    if NUM_M == 1:
        dbias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        for zb in tl.static_range(NUM_M):
            zrows = zb * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(partial + zrows[:, None] * N + cols[None, :], tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                     mask=(zrows < N)[:, None] & col_ok[None, :])
        tl.debug_barrier()
    for window in range(first, last):
        b_c, y_c, x_c, lab_c = _tokens(window, cols, n_wh, n_ww, height, width, WS, SHIFT)
        k_tok = b_c * stride_b + y_c * stride_h + x_c * stride_w
        k = _load_operand(qkv_ptr + k_tok[:, None] + (n_channels + ch)[None, :] * stride_c, kv_ok, EMULATE_RNE)
        v = _load_operand(qkv_ptr + k_tok[:, None] + (2 * n_channels + ch)[None, :] * stride_c, kv_ok,
                          EMULATE_RNE)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for mb in range(0, NUM_M):  # a loop, not unrolled: unrolling raised ptxas' register pressure
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            rd_ok = row_ok[:, None] & d_ok[None, :]
            b_r, y_r, x_r, lab_r = _tokens(window, rows, n_wh, n_ww, height, width, WS, SHIFT)
            q_tok = b_r * stride_b + y_r * stride_h + x_r * stride_w
            q = _load_operand(qkv_ptr + q_tok[:, None] + ch[None, :] * stride_c, rd_ok, EMULATE_RNE)
            g_tok = b_r * stride_gb + y_r * stride_gh + x_r * stride_gw
            do = _load_operand(dout_ptr + g_tok[:, None] + ch[None, :] * stride_gc, rd_ok, EMULATE_RNE)
            lse = tl.load(lse_ptr + (window * n_heads + head) * N + rows, mask=row_ok, other=0)
            s = _scores(q, tl.trans(k), bias_ptr, head, rows, cols, row_ok, col_ok, lab_r, lab_c, scale,
                        stride_bh, stride_bq, stride_bk, SHIFT, DTYPE, EMULATE_RNE)
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(_lowp(p, DTYPE, EMULATE_RNE)), do, DTYPE, EMULATE_RNE)
            dp = _dot(do, tl.trans(v), DTYPE, EMULATE_RNE)
            delta = tl.sum(p * dp, axis=1)
            ds = p * (dp - delta[:, None])
            ds_low = _lowp(ds, DTYPE, EMULATE_RNE)
            dq = _dot(ds_low, k, DTYPE, EMULATE_RNE) * scale
            d_tok = b_r * stride_db + y_r * stride_dh + x_r * stride_dw
            tl.store(dqkv_ptr + d_tok[:, None] + ch[None, :] * stride_dc, cast(dq, GRAD_DTYPE, EMULATE_RNE),
                     mask=rd_ok)
            dk += _dot(tl.trans(ds_low), q, DTYPE, EMULATE_RNE)
            if NUM_M == 1:
                dbias += ds
            else:
                tile = partial + rows[:, None] * N + cols[None, :]
                tile_ok = row_ok[:, None] & col_ok[None, :]
                tl.store(tile, tl.load(tile, mask=tile_ok, other=0) + ds, mask=tile_ok)
                tl.debug_barrier()  # the next window's load of this tile must see the store
        dk_tok = b_c * stride_db + y_c * stride_dh + x_c * stride_dw
        tl.store(dqkv_ptr + dk_tok[:, None] + (n_channels + ch)[None, :] * stride_dc,
                 cast(dk * scale, GRAD_DTYPE, EMULATE_RNE), mask=kv_ok)
        tl.store(dqkv_ptr + dk_tok[:, None] + (2 * n_channels + ch)[None, :] * stride_dc,
                 cast(dv, GRAD_DTYPE, EMULATE_RNE), mask=kv_ok)
    if NUM_M == 1:
        brows = tl.arange(0, BLOCK_M)
        tl.store(partial + brows[:, None] * N + cols[None, :], dbias, mask=(brows < N)[:, None] & col_ok[None, :])


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, n_elements, BLOCK: tl.constexpr,
                         EMULATE_RNE: tl.constexpr):
    """out[i] = sum over p of partial[p, i], p in increasing order (fp32), rounded to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, n_partials):
        acc += tl.load(partial_ptr + p * n_elements + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, cast(acc, out_ptr.dtype.element_ty, EMULATE_RNE), mask=ok)


def _geometry(qkv: torch.Tensor, num_heads: int, window_size: int):
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    head_dim = c // num_heads
    n = window_size * window_size
    block_n = max(16, _utils.next_power_of_2(n))
    large = block_n > 64 or qkv.dtype == torch.float32
    block_m = min(block_n, max(16, min(MAX_BLOCK_M, LARGE_BLOCK_M) if large else MAX_BLOCK_M))
    return dict(b=b, h=h, w=w, c=c, head_dim=head_dim, n=n, n_wh=h // window_size, n_ww=w // window_size,
                n_windows=b * (h // window_size) * (w // window_size), block_n=block_n, block_m=block_m,
                block_d=max(16, _utils.next_power_of_2(head_dim)), num_m=_utils.cdiv(n, block_m),
                num_warps=4 if block_n <= 64 else 8)


def _bwd_groups(n_windows: int, num_heads: int):
    """(windows per program, programs per head) for the backward."""
    groups = min(n_windows, max(1, _utils.cdiv(BWD_TARGET_PROGRAMS, num_heads)))
    per_program = _utils.cdiv(n_windows, groups)
    return per_program, _utils.cdiv(n_windows, per_program)


def window_attention_fwd(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, window_size: int, shift_size: int,
                         scale: float):
    """-> (out (B, H, W, C) in qkv's dtype, logsumexp (windows, heads, N) fp32). bias: (heads, N, N)."""
    g = _geometry(qkv, num_heads, window_size)
    out = _utils.alloc((g["b"], g["h"], g["w"], g["c"]), dtype=qkv.dtype, device=qkv.device)
    lse = _utils.alloc((g["n_windows"], num_heads, g["n"]), dtype=torch.float32, device=qkv.device)
    if g["n_windows"]:
        _window_attention_fwd_kernel[(g["n_windows"], num_heads, g["num_m"])](
            qkv, bias, out, lse, g["n_wh"], g["n_ww"], g["h"], g["w"], g["c"], num_heads, scale,
            *qkv.stride(), *out.stride(), *bias.stride(),
            N=g["n"], WS=window_size, SHIFT=shift_size, HEAD_DIM=g["head_dim"],
            BLOCK_M=g["block_m"], BLOCK_N=g["block_n"], BLOCK_D=g["block_d"],
            EMULATE_RNE=_utils.triton_interpreted(_window_attention_fwd_kernel), num_warps=g["num_warps"])
    return out, lse


def window_attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, lse: torch.Tensor,
                         num_heads: int, window_size: int, shift_size: int, scale: float):
    """-> (grad_qkv like qkv (contiguous), grad_bias (heads, N, N) in bias's dtype)."""
    g = _geometry(qkv, num_heads, window_size)
    n = g["n"]
    grad_qkv = _utils.alloc(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    grad_bias = _utils.alloc((num_heads, n, n), dtype=bias.dtype, device=bias.device)
    emulate = _utils.triton_interpreted(_window_attention_bwd_kernel)
    if not g["n_windows"]:
        return grad_qkv, grad_bias.zero_()
    per_program, groups = _bwd_groups(g["n_windows"], num_heads)
    partial = _utils.alloc((groups, num_heads, n, n), dtype=torch.float32, device=qkv.device)
    _window_attention_bwd_kernel[(num_heads, groups)](
        qkv, bias, grad_out, lse, grad_qkv, partial,
        g["n_windows"], per_program, g["n_wh"], g["n_ww"], g["h"], g["w"], g["c"], num_heads, scale,
        *qkv.stride(), *grad_out.stride(), *grad_qkv.stride(), *bias.stride(),
        N=n, WS=window_size, SHIFT=shift_size, HEAD_DIM=g["head_dim"],
        BLOCK_M=g["block_m"], BLOCK_N=g["block_n"], BLOCK_D=g["block_d"], NUM_M=g["num_m"],
        EMULATE_RNE=emulate, num_warps=g["num_warps"])
    n_elements = num_heads * n * n
    block = min(SUM_BLOCK, _utils.next_power_of_2(n_elements))
    _sum_partials_kernel[(_utils.cdiv(n_elements, block),)](partial, grad_bias, groups, n_elements, BLOCK=block,
                                                           EMULATE_RNE=emulate)
    return grad_qkv, grad_bias


def _fake_shapes(qkv, num_heads, window_size):
    b, h, w, c3 = qkv.shape
    n_windows = b * (h // window_size) * (w // window_size)
    return (b, h, w, c3 // 3), (n_windows, num_heads, window_size * window_size)


@torch.library.custom_op("simmim_kernels::window_attention_fwd", mutates_args=())
def _fwd_op(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, window_size: int, shift_size: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_fwd(qkv, bias, num_heads, window_size, shift_size, scale)


@_fwd_op.register_fake
def _(qkv, bias, num_heads, window_size, shift_size, scale):
    out_shape, lse_shape = _fake_shapes(qkv, num_heads, window_size)
    return qkv.new_empty(out_shape), qkv.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("simmim_kernels::window_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, lse: torch.Tensor, num_heads: int,
            window_size: int, shift_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_bwd(grad_out, qkv, bias, lse, num_heads, window_size, shift_size, scale)


@_bwd_op.register_fake
def _(grad_out, qkv, bias, lse, num_heads, window_size, shift_size, scale):
    n = window_size * window_size
    return qkv.new_empty(qkv.shape), bias.new_empty((num_heads, n, n))


class WindowAttentionFunction(torch.autograd.Function):
    """Fused forward and backward; saves qkv, bias and the fp32 logsumexp. bias is (heads, N, N)."""

    @staticmethod
    def forward(ctx, qkv, bias, num_heads: int, window_size: int, shift_size: int, scale: float):
        fwd = window_attention_fwd if _utils.plain_eager(qkv, bias) else _fwd_op
        out, lse = fwd(qkv, bias, num_heads, window_size, shift_size, scale)
        ctx.save_for_backward(qkv, bias, lse)
        ctx.args = (num_heads, window_size, shift_size, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias, lse = ctx.saved_tensors
        bwd = window_attention_bwd if _utils.plain_eager(grad_out, qkv, bias, lse) else _bwd_op
        grad_qkv, grad_bias = bwd(grad_out, qkv, bias, lse, *ctx.args)
        return (grad_qkv if ctx.needs_input_grad[0] else None, grad_bias if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def _check_dtypes(qkv: torch.Tensor, bias: torch.Tensor):
    """None if the kernels take these dtypes, else the ValueError saying why not."""
    if qkv.dtype not in DTYPES:
        return ValueError(f"window_attention: backend='triton' supports qkv dtypes {[str(d) for d in DTYPES]}, "
                          f"got {qkv.dtype}")
    if bias.dtype not in (torch.float32, qkv.dtype):
        return ValueError(f"window_attention: backend='triton' needs bias in fp32 or qkv's dtype {qkv.dtype}, "
                          f"got {bias.dtype}")
    return None


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, window_size: int, shift_size: int,
                     scale=None, backend: str = "auto") -> torch.Tensor:
    """Swin (shifted-)window multi-head attention between the qkv and output projections, fused.

    Equals ``roll(-shift) -> window partition -> softmax(q k^T * scale + bias + mask) v -> window
    reverse -> roll(+shift)`` of a Swin block, with the projections left out (see
    ``simmim_kernels.reference.window_attention``, the plain-PyTorch formula).

    Args:
        qkv: (B, H, W, 3 * C) channels-last, the block's qkv Linear on the normed map (before the
            shift); per token (3, num_heads, head_dim). fp32 / bf16 / fp16, any strides.
            H and W must be multiples of window_size.
        bias: the gathered relative position bias, (num_heads, N, N) or (1, num_heads, N, N) as
            timm's ``WindowAttention._get_rel_pos_bias()`` returns it, N = window_size**2; fp32 or
            qkv's dtype. Gets a gradient (in its dtype) if it requires one.
        num_heads, window_size: the block's.
        shift_size: 0 or the shift (0 < shift_size < window_size); the mask of the shifted
            windows (-100 between regions, as the official code) is computed, never stored.
        scale: None = head_dim ** -0.5.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton", "torch".
    Returns:
        (B, H, W, C) in qkv's dtype, in the un-shifted layout. Softmax in fp32.
    """
    check_window_attention_args(qkv, bias, num_heads, window_size, shift_size, scale)
    chosen = _utils.choose_backend("window_attention", backend, (qkv, bias), (qkv, bias),
                                   _window_attention_fwd_kernel)
    if chosen == "triton":
        problem = _check_dtypes(qkv, bias)
        if problem is not None:
            if backend == "triton":
                raise problem
            chosen = "torch"
    if chosen == "torch":
        return _reference(qkv, bias, num_heads, window_size, shift_size, scale)
    head_dim = qkv.shape[-1] // 3 // num_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    n = window_size * window_size
    return WindowAttentionFunction.apply(qkv, bias.reshape(num_heads, n, n), num_heads, window_size, shift_size,
                                         scale)
