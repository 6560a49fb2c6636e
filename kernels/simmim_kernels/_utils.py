"""Shared plumbing for the fused ops: backend choice, output allocation, block-size helpers.

Imports nothing but torch (and triton, lazily, to report whether it can run).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

# Dtypes the Triton kernels read and write. fp64 exists so that torch.autograd.gradcheck can run on
# the fused path; the kernels then accumulate in fp64 instead of fp32.
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")

try:
    import triton  # noqa: F401
    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as err:  # e.g. macOS / Windows wheels of torch ship no triton
    TRITON_IMPORT_ERROR = err


def triton_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit function) was built for the interpreter (TRITON_INTERPRET=1
    was set before triton was imported): only then can it run on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def alloc(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (or :func:`alloc_like`), uninitialised.

    The kernels must overwrite every element; the tests monkeypatch this to fill NaN so that an
    element a kernel forgot shows up.
    """
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def alloc_like(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Like ``torch.empty_like`` (keeps a dense tensor's strides, e.g. channels-last); see :func:`alloc`."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True when nothing traces this call (no torch.compile / export, no dispatch mode, plain tensors).

    The fused ops are torch.library custom ops so that compilers see them as single nodes; in plain
    eager mode the autograd.Functions call the implementations directly instead, because each
    custom-op dispatch costs several microseconds of CPU time, which is a large share of a kernel
    that moves ~100 MB in ~40 us on a GPU.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_backend(op: str, backend: str, tensors: Iterable[torch.Tensor], float_tensors: Iterable[torch.Tensor],
                   kernel, no_grad: Iterable[torch.Tensor] = ()) -> str:
    """Resolve ``backend`` ("auto" / "triton" / "torch") to "triton" or "torch" for one call.

    Args are assumed valid (the reference's checks ran). "auto" takes Triton for CUDA tensors whose
    dtypes the kernels support; "triton" raises (RuntimeError: cannot run here; ValueError: an
    argument the kernels do not support) instead of falling back. ``no_grad``: tensors the fused
    backward gives no gradient to (the mask); if one requires grad, only the reference is exact.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    tensors, float_tensors, no_grad = list(tensors), list(float_tensors), list(no_grad)
    device = tensors[0].device
    problem = None
    if TRITON_IMPORT_ERROR is not None:
        problem = RuntimeError(f"{op}: backend='triton' needs triton, which failed to import: {TRITON_IMPORT_ERROR}")
    elif device.type == "cpu":
        if not triton_interpreted(kernel):
            problem = RuntimeError(
                f"{op}: backend='triton' got CPU tensors; Triton runs on the CPU only in its interpreter, which "
                f"needs TRITON_INTERPRET=1 in the environment before triton is first imported "
                f"(it is {os.environ.get('TRITON_INTERPRET')!r}). Use a CUDA tensor or backend='torch'.")
    elif device.type != "cuda":
        problem = RuntimeError(f"{op}: backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device}")
    if problem is None:
        for t in float_tensors:
            if t.dtype not in KERNEL_FLOAT_DTYPES:
                problem = ValueError(f"{op}: backend='triton' supports float dtypes "
                                     f"{[str(d) for d in KERNEL_FLOAT_DTYPES]}, got {t.dtype}")
                break
    if problem is None:
        for t in tensors:
            if t.dtype not in KERNEL_FLOAT_DTYPES + MASK_DTYPES:
                problem = ValueError(f"{op}: backend='triton' does not support dtype {t.dtype}")
                break
    if problem is None and any(t.requires_grad for t in no_grad) and torch.is_grad_enabled():
        problem = ValueError(f"{op}: backend='triton' gives the mask no gradient, but mask requires grad; "
                             f"use backend='torch' (or 'auto', which then takes it) to differentiate the mask")
    if backend == "triton":
        if problem is not None:
            raise problem
        return "triton"
    # auto: Triton where it is the fast path (CUDA), the reference everywhere else.
    return "triton" if problem is None and device.type == "cuda" else "torch"
