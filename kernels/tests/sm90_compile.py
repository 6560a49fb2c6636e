"""Compile the fused kernels for an H100 (sm_90) on a machine without a GPU.

Runs the real host code of each op on CPU tensors with every Triton launch intercepted, derives the
specialisation Triton's JIT would use for those arguments (constexpr ints equal to 1, 16-byte
alignment), compiles that launch to PTX and a cubin with Triton's own compiler and ptxas, and counts
the vectorised global loads / stores in the PTX. The interpreter tests prove the kernels' results;
this proves that the compiled path builds, for the launches the ops really make.

    python kernels/tests/sm90_compile.py      # prints one JSON line per launch; needs TRITON_INTERPRET unset
    python kernels/tests/sm90_compile.py window   # only the cases whose name starts with "window"

Each line also has the compiled kernel's registers per thread and stack frame (cuobjdump on the
cubin), spill bytes (ptxas -v) and shared memory (Triton's allocation).
Used by tests/test_kernels_sm90.py in a subprocess.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

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

wa = sys.modules["simmim_kernels.window_attention"]  # the module (the package exports the op under its name)

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
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True   # ptxas -v: registers and spill bytes, printed to stdout
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    ptx = kernel.asm["ptx"]
    return dict(kernel=fn.__name__, cubin=len(kernel.asm.get("cubin", b"")),
                num_warps=kernel.metadata.num_warps, shared_bytes=kernel.metadata.shared,
                **resource_usage(kernel.asm.get("cubin", b"")),
                spill_store_bytes=int(spills[-1][0]) if spills else -1,
                spill_load_bytes=int(spills[-1][1]) if spills else -1,
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
                vector_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
                scalar_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s", ptx)),
                scalar_stores=len(re.findall(r"st\.global(?:\.\w+)*\.(?:b|u|s|f)\d+\s", ptx)))


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory (spills) of the cubin's kernel, from cuobjdump."""
    from triton.backends.nvidia.compiler import get_ptxas
    tool = os.path.join(os.path.dirname(get_ptxas(TARGET.arch).path), "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return dict(registers=int(found.get("REG", -1)), local_bytes=int(found.get("LOCAL", -1)),
                stack_bytes=int(found.get("STACK", -1)))


def launches():
    """(case name, [recorded launches]) for the layouts and dtypes the ops support."""
    log = []
    for mod, names in ((ms, ["_mask_substitute_fwd_kernel", "_mask_substitute_bwd_kernel", "_sum_rows_kernel"]),
                       (ml, ["_masked_l1_fwd_kernel", "_masked_l1_finish_kernel", "_masked_l1_bwd_kernel"]),
                       (wa, ["_window_attention_fwd_kernel", "_window_attention_bwd_kernel", "_sum_partials_kernel"])):
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
    yield from window_launches(record)


def window_launches(record):
    """Swin-B (window 6, C 128, 4 heads) and Swin-L (window 12, C 192, 6 heads) first-stage shapes at
    192 px (48 x 48 map), head dim 32, shifted (the unshifted kernels lack only the mask), bf16 and
    fp32 (fp32 bias)."""
    for ws, shift, c, heads, dtype in [
        (6, 3, 128, 4, torch.bfloat16), (6, 3, 128, 4, torch.float32),
        (12, 6, 192, 6, torch.bfloat16), (12, 6, 192, 6, torch.float32),
    ]:
        qkv = torch.randn(2, 48, 48, 3 * c, dtype=dtype)
        bias = torch.randn(heads, ws * ws, ws * ws)
        grad = torch.randn(2, 48, 48, c, dtype=dtype)
        lse = torch.randn(2 * (48 // ws) ** 2, heads, ws * ws)
        scale = (c // heads) ** -0.5
        tag = f"window {ws} shift {shift} (2, 48, 48, {3 * c}) heads {heads} {dtype}"
        yield record(f"{tag} fwd", lambda: wa.window_attention_fwd(qkv, bias, heads, ws, shift, scale))
        yield record(f"{tag} bwd", lambda: wa.window_attention_bwd(grad, qkv, bias, lse, heads, ws, shift, scale))


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for case, log in launches():
        if not case.startswith(only):
            continue
        for fn, _grid, args, kwargs in log:
            try:
                result = compile_launch(fn, args, kwargs)
            except Exception as err:  # report and go on: the test names every failure
                result = dict(kernel=fn.__name__, error=f"{type(err).__name__}: {err}"[:2000])
            print(json.dumps(dict(case=case, **result)), flush=True)


if __name__ == "__main__":
    main()
