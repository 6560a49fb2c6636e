"""Triton helpers shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def cast(v, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even, which compiled Triton (and torch) use.

    Triton's CPU interpreter truncates fp32 -> bf16 instead; with EMULATE_RNE (set only when the
    kernel runs interpreted) the fp32 bits are rounded by hand first, so CPU results match the
    GPU's bit for bit. NaN passes through unchanged.
    """
    if EMULATE_RNE:
        if dtype == tl.bfloat16:
            v32 = v.to(tl.float32)
            bits = v32.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = tl.where(v32 != v32, v32, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)
