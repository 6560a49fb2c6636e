"""The fused ops, re-exported from the `simmim_kernels` distribution (kernels/ in this repository).

`simmim_kernels` is installed on its own (``pip install ./kernels``) by MIM code that wants the ops
without this package; code written against ``simmim_fast.kernels`` keeps working through this
module, submodules included (``simmim_fast.kernels.reference`` is ``simmim_kernels.reference``).
"""
import importlib
import sys

import simmim_kernels
from simmim_kernels import *  # noqa: F401,F403
from simmim_kernels import __all__  # noqa: F401

for _name in ("reference", "_utils", "_triton_helpers", "mask_substitute", "masked_l1", "window_attention"):
    try:
        _module = importlib.import_module(f"simmim_kernels.{_name}")
    except ImportError:  # no triton in this torch build: the kernel modules cannot import
        continue
    sys.modules[f"{__name__}.{_name}"] = _module
    if _name not in globals():  # the op window_attention keeps its name; its module is in sys.modules
        globals()[_name] = _module
del importlib, sys, simmim_kernels
