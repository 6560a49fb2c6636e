"""Compile the fused kernels for an H100 (sm_90) on a machine without a GPU.

Runs the real host code of each op on CPU tensors with every Triton launch intercepted, derives the
specialisation Triton's JIT would use for those arguments (constexpr ints equal to 1, 16-byte
alignment), compiles that launch to PTX and a cubin with Triton's own compiler and ptxas, and counts
the vectorised global loads / stores in the PTX. The interpreter tests prove the kernels' results;
this proves that the compiled path builds, for the launches the ops really make.

    python kernels/tests/sm90_compile.py      # prints one JSON line per launch; needs TRITON_INTERPRET unset
Used by tests/test_kernels_sm90.py in a subprocess.
"""
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py compiles real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402

try:  # Triton internals (checked with triton 3.8); another version may lack them: then say so and stop
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print(json.dumps(dict(skip=f"triton {triton.__version__} lacks an internal this check uses: {err}")))
    sys.exit(0)

from simmim_kernels import mask_substitute as ms  # noqa: E402
from simmim_kernels import masked_l1 as ml  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a @triton.jit kernel: records launches instead of running them."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


def compile_launch(fn, args, kwargs):
    names = fn.arg_names
    values = dict(zip(names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # ints equal to 1 become compile-time constants, as in the JIT
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = kind
        if spec and BaseBackend.parse_attr(spec):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET)
    ptx = kernel.asm["ptx"]
    return dict(kernel=fn.__name__, cubin=len(kernel.asm.get("cubin", b"")),
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
                vector_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
                scalar_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s", ptx)),
                scalar_stores=len(re.findall(r"st\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s", ptx)))


def launches():
    """(case name, [recorded launches]) for the layouts and dtypes the ops support."""
    log = []
    for mod, names in ((ms, ["_mask_substitute_fwd_kernel", "_mask_substitute_bwd_kernel", "_sum_rows_kernel"]),
                       (ml, ["_masked_l1_fwd_kernel", "_masked_l1_finish_kernel", "_masked_l1_bwd_kernel"])):
        for name in names:
            setattr(mod, name, Recorder(getattr(mod, name), log))

    def record(case, run):
        del log[:]
        run()
        return case, list(log)

    for shape, dtype, mask_dtype, token_dtype in [
        ((2, 48, 48, 128), torch.bfloat16, torch.bool, torch.float32),     # Swin-B, the benchmark case
        ((2, 48, 48, 192), torch.bfloat16, torch.bool, torch.float32),     # Swin-L
        ((2, 196, 768), torch.bfloat16, torch.bool, torch.float32),        # ViT-B
        ((2, 48, 48, 128), torch.float32, torch.float32, torch.float32),   # fp32, blending mask
        ((2, 7, 5, 130), torch.float16, torch.int64, torch.bfloat16),
        ((2, 3, 5), torch.float64, torch.float64, torch.float64),          # gradcheck dtype
    ]:
        x = torch.randn(shape, dtype=dtype)
        mask = (torch.rand(shape[:-1]) < 0.6).to(mask_dtype)
        token = torch.randn(shape[-1], dtype=token_dtype)
        tag = f"substitute {tuple(shape)} {dtype} mask {mask_dtype} token {token_dtype}"
        yield record(f"{tag} fwd", lambda: ms.mask_token_substitute_fwd(x, mask, token))
        yield record(f"{tag} bwd", lambda: ms.mask_token_substitute_bwd(torch.randn_like(x), mask, token))
    for b, c, size, p, dtype, tdtype, shuffle, need_target in [
        (2, 3, 192, 4, torch.bfloat16, torch.float32, 1, False),    # Swin at 192, the benchmark case
        (2, 3, 192, 4, torch.bfloat16, torch.float32, 32, False),   # the same, un-shuffled head output
        (2, 3, 224, 16, torch.bfloat16, torch.float32, 1, False),   # ViT-B at 224
        (2, 3, 192, 4, torch.float32, torch.float32, 1, True),
        (2, 3, 28, 4, torch.float16, torch.float16, 1, True),
        (2, 2, 8, 2, torch.float64, torch.float64, 1, True),
    ]:
        pred = torch.randn(b, c * shuffle * shuffle, size // shuffle, size // shuffle, dtype=dtype)
        target = torch.randn(b, c, size, size, dtype=tdtype)
        mask = torch.rand(b, size // p, size // p) < 0.6
        tag = f"l1 {(b, c, size, size)} p{p} {dtype} target {tdtype} shuffle {shuffle}"
        loss, denom = torch.ones((), dtype=torch.float32), torch.ones((), dtype=torch.float32)
        yield record(f"{tag} fwd", lambda: ml.masked_l1_fwd(pred, target, mask, p, 1e-5, shuffle))
        yield record(f"{tag} bwd", lambda: ml.masked_l1_bwd(loss, denom, pred, target, mask, p, shuffle, need_target))


def main():
    for case, log in launches():
        for fn, _grid, args, kwargs in log:
            try:
                result = compile_launch(fn, args, kwargs)
            except Exception as err:  # report and go on: the test names every failure
                result = dict(kernel=fn.__name__, error=f"{type(err).__name__}: {err}"[:2000])
            print(json.dumps(dict(case=case, **result)), flush=True)


if __name__ == "__main__":
    main()
