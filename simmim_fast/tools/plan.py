"""``simmim-fast plan``: will a config fit on N GPUs of M GB, and how (ZeRO stage, offload, activation
checkpointing, micro batch, gradient accumulation)?

    simmim-fast plan --config configs/swin_l.json --gpus 8 --gpu-memory-gb 80
    simmim-fast plan --config configs/swin_l.json --gpus 1 --gpu-memory-gb 24 --cpu-memory-gb 128 --json

Activation memory is measured, not guessed: one forward + backward of the config's SimMIM model runs
on the meta device (shapes and dtypes only, no memory, no arithmetic) at two small batch sizes,
while a dispatch mode keeps the bytes of every live tensor storage and their peak (activations,
temporaries and, separately, parameter gradients as they accumulate). Peak = fixed + per image x
batch, fitted from the two measurements. The weights, gradients and optimiser states follow the
ZeRO partitioning rules of DeepSpeed (Rajbhandari et al., "ZeRO", 2020) for this engine's
precisions; the allowances the measurement cannot see (CUDA context and library workspaces,
allocator fragmentation, the host process) are stated constants, overridable from the command
line. GB here is 2^30 bytes (what ``nvidia-smi`` shows in MiB, / 1024). docs/ENGINE.md
"Memory planner" gives every rule.

``train.py`` runs the same estimate for the config it was given on the GPUs it got
(``preflight_memory``) and refuses, with one line naming the option to change, a config that
cannot fit.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from ..cli import add_config_arguments
from ..config import Config, config_to_dict, load_config
from ..engine.ds_config import resolve_precision
from ..errors import UserError
from ..models import SimMIM

__all__ = ["add_arguments", "main", "plan", "Plan", "Choice", "ModelFacts", "ActivationFit", "model_facts",
           "measure_activations", "activation_fit", "estimate", "check_fits", "preflight_memory",
           "OFFLOADS", "GIB", "FRAGMENTATION", "GPU_RESERVED_GB", "HOST_PROCESS_GB"]

GIB = 2 ** 30
# Allowances for what a measurement on the meta device cannot see (stated, not measured here):
FRAGMENTATION = 0.10       # PyTorch's caching allocator: block rounding and fragmentation, x allocated bytes
GPU_RESERVED_GB = 1.0      # per GPU, outside the allocator: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
HOST_PROCESS_GB = 2.0      # per rank on its host: Python, torch/CUDA/DeepSpeed libraries, the data loader
OFFLOADS = ("none", "optimizer", "optimizer_and_params")
MEASURE_BATCHES = (2, 4)   # the two micro batches the activation fit is measured at (meta: size costs nothing)
# DeepSpeed ZeRO-3 keeps parameters with fewer elements than this whole on every rank (ds_config.py).
ZERO3_PERSISTENCE_THRESHOLD = 100_000


# ----------------------------------------------------------------------------------------------
# Measuring activation memory on the meta device

class _LiveBytes(TorchDispatchMode):
    """Bytes of every live tensor storage created under the mode, and their peaks.

    A storage is counted once (views share it) from the op that creates it until it is freed (a
    weakref finalizer on the storage). Storages that become a parameter's ``.grad`` move from the
    activation count to the gradient count (``mark_grad``, a post-accumulate-grad hook), so both
    the activation peak and the peak of activations + gradients are kept."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.ignored: set = set()
        self.grads: set = set()
        self.act = 0
        self.grad = 0
        self.peak_act = 0
        self.peak_act_grads = 0

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        if key in self.grads:
            self.grads.discard(key)
            self.grad -= n
        else:
            self.act -= n

    def ignore(self, tensors) -> None:
        """Storages that exist before the measurement (parameters, buffers): a view of one (``w.t()``
        inside a linear layer) is not a new allocation."""
        self.ignored |= {t.untyped_storage()._cdata for t in tensors}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignored:
            return
        n = storage.nbytes()
        self.live[key] = n
        self.act += n
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak_act = max(self.peak_act, self.act)
        self.peak_act_grads = max(self.peak_act_grads, self.act + self.grad)
        return out

    def mark_grad(self, param: torch.Tensor) -> None:
        key = param.grad.untyped_storage()._cdata
        if key in self.live and key not in self.grads:
            self.grads.add(key)
            n = self.live[key]
            self.act -= n
            self.grad += n


# CUDA autocast's cast policy (aten/src/ATen/autocast_mode.cpp) for the functions timm's Swin, SwinV2
# and BEiT call: these run in the autocast dtype (their floating inputs are cast, and the cast copy is
# what autograd saves) ...
_LOWER_PRECISION = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm",
                    "addmv", "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d", "prelu", "scaled_dot_product_attention"}
# ... these in fp32 (lower-precision inputs are cast up) ...
_FP32 = {"layer_norm", "group_norm", "cosine_similarity", "l1_loss", "mse_loss", "smooth_l1_loss", "logsumexp",
         "exp", "log", "rsqrt", "reciprocal", "pow"}
# ... and these compute and return fp32 from the input as it is ("fp32_set_opt_dtype": dtype=fp32 is
# passed, the input is not cast, so what they save keeps its dtype). F.normalize: see
# _normalize_under_autocast.
_FP32_OPT_DTYPE = {"softmax", "log_softmax", "cumsum", "norm", "vector_norm"}


class _CudaAutocastOnMeta(TorchFunctionMode):
    """What ``torch.autocast("cuda", dtype)`` does to tensor dtypes, on the meta device (which has no
    autocast): the policy above, with autocast's cache of weight casts (a leaf tensor that requires
    grad is cast once per forward and the copy lives until the forward ends). Active during the
    backward too, for the forward that activation checkpointing recomputes under the autocast state
    it recorded; there each cast is made afresh (torch.utils.checkpoint enters a new autocast context,
    with its own cache, per recomputed block).

    Also, whatever the dtype: ``scaled_dot_product_attention`` on the meta device would take the
    math path and save the attention matrix; the fused kernels a GPU (or the CPU) runs keep only the
    log-sum-exp, so the CPU flash-attention op (which has a meta function) stands in for them."""

    def __init__(self, dtype: Optional[torch.dtype]):
        super().__init__()
        self.dtype = dtype
        self.cache: Dict[int, torch.Tensor] = {}
        self.caching = True

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if dtype != torch.float32 and x.dtype != torch.float32:
            return x  # autocast casts fp32 down and lower precision up, nothing else
        if self.caching and x.is_leaf and x.requires_grad:
            key = id(x)
            if key not in self.cache:
                self.cache[key] = x.to(dtype)
            return self.cache[key]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None:
            if name in _LOWER_PRECISION:
                args, kwargs = tree_map(lambda x: self._cast(x, self.dtype), (args, kwargs))
            elif name in _FP32:
                args, kwargs = tree_map(lambda x: self._cast(x, torch.float32), (args, kwargs))
            elif (name in _FP32_OPT_DTYPE and kwargs.get("dtype") is None and args
                  and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.bfloat16, torch.float16)):
                kwargs = {**kwargs, "dtype": torch.float32}
        if name == "scaled_dot_product_attention":
            return _fused_attention(func, args, kwargs)
        if name == "normalize" and self.dtype is not None:
            return _normalize_under_autocast(func, args, kwargs)
        return func(*args, **kwargs)


def _normalize_under_autocast(func, args, kwargs):
    # F.normalize is a composite, input / input.norm(): under CUDA autocast the norm gets dtype fp32
    # (the "fp32_set_opt_dtype" policy: computed and returned in fp32, the input saved as it came)
    # and the division promotes to fp32. Spelled out here, since inside a TorchFunctionMode handler
    # the composite's inner calls are not seen.
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dtype == torch.float32 or kwargs.get("out") is not None:
        return func(*args, **kwargs)
    names = ("p", "dim", "eps")
    opts = {"p": 2.0, "dim": 1, "eps": 1e-12, **dict(zip(names, args[1:])), **kwargs}
    norm = torch.linalg.vector_norm(x, opts["p"], opts["dim"], keepdim=True, dtype=torch.float32)
    denom = norm.clamp_min(opts["eps"]).expand_as(x)
    return x / denom


def _fused_attention(func, args, kwargs):
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    scale = kwargs.get("scale")
    if q.dim() != 4 or (mask is not None and mask.dtype != q.dtype):
        return func(*args, **kwargs)
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale)[0]
    except RuntimeError:  # a shape the fused kernel does not take: PyTorch would take the math path too
        return func(*args, **kwargs)


def _checkpoint_blocks(model: nn.Module, every: int = 1) -> int:
    """Activation checkpointing of every ``every``-th transformer block (torch.utils.checkpoint,
    non-reentrant), counting the children of every ``blocks`` container (timm's Swin / SwinV2 stages,
    BEiT) in order from 0. Returns the number of blocks wrapped. The meta device has no RNG state to
    preserve."""
    wrapped = index = 0
    for module in list(model.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            for block in blocks:
                if index % every == 0:
                    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                                      preserve_rng_state=False)
                    wrapped += 1
                index += 1
    return wrapped


def _checkpoint_every(value: Union[bool, int]) -> int:
    """engine.activation_checkpointing as a block interval: false -> 0 (off), true -> 1, N -> N."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise UserError(f"activation checkpointing must be false, true or a block interval N >= 1 (got {value!r})")
    return value


def _apply_checkpointing(model: SimMIM, every: int = 1) -> None:
    # The model's own switch when it has one (it is what training uses); else the blocks here.
    setter = getattr(model, "set_activation_checkpointing", None)
    if callable(setter):
        setter(True if every == 1 else every)
    elif not _checkpoint_blocks(model, every):
        raise UserError(f"activation checkpointing: the {model.cfg.encoder} encoder has no 'blocks' to checkpoint")


_META_MODELS: Dict[str, SimMIM] = {}


def _meta_model(cfg: Config) -> SimMIM:
    """A fresh copy of ``cfg``'s SimMIM model on the meta device (built once per model section: a copy
    costs a fraction of timm's construction)."""
    # Weights are not needed (shapes only); the fused ops' reference path runs on the meta device.
    model_cfg = dataclasses.replace(cfg.model, init_weights=None, ops_backend="torch")
    key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    if key not in _META_MODELS:
        if len(_META_MODELS) >= 4:
            _META_MODELS.clear()
        with torch.device("meta"):
            _META_MODELS[key] = SimMIM.from_config(model_cfg)
    return copy.deepcopy(_META_MODELS[key])


@dataclass(frozen=True)
class ModelFacts:
    params: int                    # parameter elements (all trainable in SimMIM pretraining)
    buffer_bytes: int              # registered buffers (e.g. relative position indices), as stored
    largest_block_params: int      # the largest transformer block (ZeRO-3 gathers one at a time)
    persistent_params: int         # ZeRO-3: parameters below the persistence threshold, kept whole on every rank


def model_facts(cfg: Config) -> ModelFacts:
    model = _meta_model(cfg)
    params = list(model.parameters())
    blocks = [b for m in model.modules() if isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList))
              for b in m.blocks]
    units = blocks or [m for m in model.modules() if not list(m.children())]
    return ModelFacts(
        params=sum(p.numel() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        largest_block_params=max(sum(p.numel() for p in u.parameters()) for u in units),
        persistent_params=sum(p.numel() for p in params if p.numel() < ZERO3_PERSISTENCE_THRESHOLD))


def measure_activations(cfg: Config, batch: int, checkpointing: Union[bool, int], precision: str,
                        half_weights: bool) -> Tuple[int, int]:
    """(peak activation bytes, peak activation + parameter-gradient bytes) of one training forward
    + backward of ``cfg``'s SimMIM model at micro batch ``batch``, measured on the meta device.
    ``precision`` bf16/fp16: CUDA autocast's dtypes; ``half_weights``: the weights (and so the
    gradients) in that dtype, as DeepSpeed's bf16/fp16 modes hold them."""
    model = _meta_model(cfg).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half_weights and dtype is not None:
        model = model.to(dtype)
    every = _checkpoint_every(checkpointing)
    if every:
        _apply_checkpointing(model, every)
    tracker = _LiveBytes()
    tracker.ignore(list(model.parameters()) + list(model.buffers()))
    hooks = [p.register_post_accumulate_grad_hook(tracker.mark_grad) for p in model.parameters()]
    m = cfg.model
    tokens = m.img_size // m.patch_size
    autocast = _CudaAutocastOnMeta(dtype)
    try:
        with tracker:
            images = torch.empty(batch, m.in_chans, m.img_size, m.img_size, device="meta")  # the loader's fp32
            mask = torch.empty(batch, tokens, tokens, dtype=torch.uint8, device="meta")
            with autocast:
                loss = model(images, mask)
            autocast.cache.clear()  # autocast drops its weight casts when the forward's context exits
            autocast.caching = False
            with autocast:
                _run_backward(loss)
            del loss, images, mask
    finally:
        for h in hooks:
            h.remove()
    return tracker.peak_act, tracker.peak_act_grads


def _run_backward(loss: torch.Tensor) -> None:
    # The autograd engine itself: Tensor.backward / torch.autograd.backward are torch functions, which
    # a TorchFunctionMode sees with itself popped, so a recomputed checkpoint forward would run without
    # the autocast emulation; the engine call keeps the mode on the stack.
    torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                              allow_unreachable=True, accumulate_grad=True)


@dataclass(frozen=True)
class ActivationFit:
    """Peak bytes = fixed + per_image x micro batch, for activations alone and with the gradients."""
    act_fixed: float
    act_per_image: float
    act_grads_fixed: float
    act_grads_per_image: float

    def act(self, batch: int) -> float:
        return self.act_fixed + self.act_per_image * batch

    def act_grads(self, batch: int) -> float:
        return self.act_grads_fixed + self.act_grads_per_image * batch


_FIT_CACHE: Dict[Tuple[str, int, str, bool], ActivationFit] = {}


def activation_fit(cfg: Config, checkpointing: Union[bool, int], precision: str, half_weights: bool
                   ) -> ActivationFit:
    """The measured activation fit for ``cfg``'s model, from ``MEASURE_BATCHES`` (cached per model
    section and setting: the measurement is a few forward + backward passes on the meta device)."""
    key = (json.dumps(config_to_dict(cfg)["model"], sort_keys=True), _checkpoint_every(checkpointing), precision,
           bool(half_weights))
    if key not in _FIT_CACHE:
        b1, b2 = MEASURE_BATCHES
        a1, g1 = measure_activations(cfg, b1, checkpointing, precision, half_weights)
        a2, g2 = measure_activations(cfg, b2, checkpointing, precision, half_weights)
        act_slope = (a2 - a1) / (b2 - b1)
        grad_slope = (g2 - g1) / (b2 - b1)
        _FIT_CACHE[key] = ActivationFit(max(a1 - act_slope * b1, 0.0), act_slope,
                                        max(g1 - grad_slope * b1, 0.0), grad_slope)
    return _FIT_CACHE[key]


# ----------------------------------------------------------------------------------------------
# The estimate

@dataclass
class Choice:
    zero_stage: int
    offload: str
    activation_checkpointing: bool
    micro_batch: int
    per_gpu_gb: float
    per_host_gb: float
    fits: bool
    fits_gpu: bool
    fits_host: bool
    accumulation_steps: Optional[int]
    gpu_breakdown_gb: Dict[str, float]
    host_breakdown_gb: Dict[str, float]

    def record(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def settings(self, mode: str = "deepspeed") -> List[str]:
        """The --set options that select this choice (from a config in engine ``mode``)."""
        out = [f"engine.zero_stage={self.zero_stage}", f"train.micro_batch_size={self.micro_batch}"]
        if mode == "torch" and (self.zero_stage > 1 or self.offload != "none"):
            out.insert(0, 'engine.mode="deepspeed"')  # the plain PyTorch engine has no ZeRO-2/3, no offload
        if self.offload != "none":
            out.append(f'engine.offload="{self.offload}"')
        if self.activation_checkpointing:
            out.append("engine.activation_checkpointing=true")
        return out


def speed_rank(zero_stage: int, offload: str, activation_checkpointing: bool) -> Tuple[int, int, int]:
    """Smaller is faster: less offload first (host traffic over PCIe every step), then no activation
    checkpointing (it recomputes the forward, about a third more work), then the lower ZeRO stage (each
    stage adds communication and hooks); within a choice the largest micro batch that fits."""
    return OFFLOADS.index(offload), int(activation_checkpointing), zero_stage


def enumerate_choices() -> List[Tuple[int, str, bool]]:
    """Every ZeRO stage x offload x checkpointing combination DeepSpeed accepts: the optimizer can be
    offloaded at ZeRO 1-3, the parameters too only at ZeRO-3."""
    out = []
    for ckpt in (False, True):
        for stage in (0, 1, 2, 3):
            for offload in OFFLOADS:
                if (offload == "optimizer" and stage == 0) or (offload == "optimizer_and_params" and stage != 3):
                    continue
                out.append((stage, offload, ckpt))
    return sorted(out, key=lambda c: speed_rank(*c))


def micro_batch_candidates(cfg: Config) -> List[int]:
    """The config's micro batch and every power of two below it, largest first."""
    top = cfg.train.micro_batch_size
    return sorted({top} | {2 ** i for i in range(int(math.log2(top)) + 1) if 2 ** i <= top}, reverse=True)


@dataclass(frozen=True)
class Allowances:
    fragmentation: float = FRAGMENTATION
    gpu_reserved_gb: float = GPU_RESERVED_GB
    host_process_gb: float = HOST_PROCESS_GB


def _precision_facts(cfg: Config) -> Tuple[str, bool]:
    precision = resolve_precision(cfg, "cuda")  # the planner plans for GPUs
    half_weights = precision == "fp16" or (precision == "bf16" and cfg.engine.bf16_weights)
    return precision, half_weights


def _optimizer_transient_bytes(cfg: Config, elements: float) -> float:
    # torch's foreach AdamW allocates one fp32 buffer of the stepped size (sqrt of the second moment);
    # the fused one (auto on CUDA) works in place.
    return 4.0 * elements if cfg.engine.optimizer == "torch_foreach" else 0.0


def estimate(cfg: Config, facts: ModelFacts, fit: ActivationFit, *, gpus: int, gpus_per_host: int,
             zero_stage: int, offload: str, micro_batch: int, allowances: Allowances = Allowances()
             ) -> Tuple[float, float, Dict[str, float], Dict[str, float]]:
    """(per-GPU bytes, per-host bytes, GPU breakdown, host breakdown) for one choice."""
    n, psi = gpus, float(facts.params)
    _precision, half_weights = _precision_facts(cfg)
    w = 2.0 if half_weights else 4.0          # bytes per weight and per gradient element
    bucket = float(cfg.engine.reduce_bucket_size)
    opt_on_host = offload in ("optimizer", "optimizer_and_params")
    params_on_host = offload == "optimizer_and_params"
    part = psi / n if zero_stage >= 1 else psi   # what one rank's optimiser steps

    # Weights on the GPU: whole below ZeRO-3; at ZeRO-3 a 1/N partition (none with params offload) plus
    # the persistent small parameters and the gathered working set (the block being computed and the
    # next prefetch bucket, twice for overlap), all in the weight dtype.
    if zero_stage < 3:
        weights, gathered = w * psi, 0.0
    else:
        weights = 0.0 if params_on_host else w * psi / n
        gathered = w * (facts.persistent_params + min(psi, 2.0 * (facts.largest_block_params + bucket)))
    # fp32 master weights: ZeRO-0 keeps the fp32 weights themselves (a separate copy only with half weights);
    # DeepSpeed's ZeRO 1-3 optimisers keep an fp32 copy of their partition whatever the weight dtype.
    master = (4.0 * psi if half_weights else 0.0) if zero_stage == 0 else 4.0 * part
    adam = 8.0 * part                          # exp_avg and exp_avg_sq, fp32
    # Backward: ZeRO 0/1 hold every gradient (measured with the activations); ZeRO 2/3 reduce-scatter them
    # from buckets into a 1/N partition. With several ranks the reduction also fills buckets.
    if zero_stage < 2:
        backward = fit.act_grads(micro_batch) + (2.0 * w * bucket if n > 1 else 0.0)
        grads_at_step = w * psi
    else:
        backward = fit.act(micro_batch) + 2.0 * w * bucket + w * psi / n
        grads_at_step = w * psi / n
    fp32_grad_partition = 4.0 * part if zero_stage >= 1 else 0.0   # what the ZeRO optimiser steps on
    step = grads_at_step + (0.0 if opt_on_host else fp32_grad_partition + _optimizer_transient_bytes(cfg, part))
    # bf16 weights at ZeRO-1: DeepSpeed's BF16_Optimizer accumulates every gradient in a full-size fp32
    # buffer (ds_config.py sets data_types.grad_accum_dtype fp32 there).
    grad_accumulation = 4.0 * psi if (half_weights and _precision == "bf16" and zero_stage == 1) else 0.0
    resident = (weights + gathered + float(facts.buffer_bytes) + grad_accumulation
                + (0.0 if opt_on_host else master + adam))
    allocated = resident + max(backward, step)
    frag = allowances.fragmentation * allocated
    reserved = allowances.gpu_reserved_gb * GIB
    gpu = {"weights": weights, "gathered_weights": gathered, "buffers": float(facts.buffer_bytes),
           "master_weights": 0.0 if opt_on_host else master, "optimizer_states": 0.0 if opt_on_host else adam,
           "fp32_grad_accumulation": grad_accumulation, "backward_peak": backward, "step_peak": step, "fragmentation": frag, "reserved": reserved}
    per_gpu = allocated + frag + reserved

    # Host: every rank first builds the model in fp32 on its host (the engine then moves it), and
    # keeps its offloaded partitions there (pinned) afterwards.
    ranks_here = min(n, gpus_per_host)
    init_copy = 4.0 * psi
    offloaded = (master + adam + fp32_grad_partition if opt_on_host else 0.0) + (w * psi / n if params_on_host else 0.0)
    process = allowances.host_process_gb * GIB
    host = {"process": ranks_here * process, "model_init_copy": ranks_here * init_copy,
            "offloaded_states": ranks_here * offloaded}
    per_host = ranks_here * (process + max(init_copy, offloaded))
    return per_gpu, per_host, {k: v / GIB for k, v in gpu.items()}, {k: v / GIB for k, v in host.items()}


@dataclass
class Plan:
    model_params: int
    precision: str
    half_weights: bool
    gpus: int
    gpus_per_host: int
    gpu_memory_gb: float
    cpu_memory_gb: Optional[float]
    global_batch_size: int
    choices: List[Choice]
    recommended: Optional[Choice]
    problem: Optional[str]
    allowances: Allowances
    activation_fits: Dict[str, ActivationFit]
    engine_mode: str = "deepspeed"

    def to_json(self) -> Dict[str, Any]:
        rec = None
        if self.recommended is not None:
            rec = {**self.recommended.record(), "set": self.recommended.settings(self.engine_mode)}
        return {"model_params": self.model_params, "precision": self.precision,
                "half_precision_weights": self.half_weights, "gpus": self.gpus, "gpus_per_host": self.gpus_per_host,
                "gpu_memory_gb": self.gpu_memory_gb, "cpu_memory_gb": self.cpu_memory_gb,
                "global_batch_size": self.global_batch_size,
                "allowances": dataclasses.asdict(self.allowances),
                "activation_bytes": {k: dataclasses.asdict(v) for k, v in self.activation_fits.items()},
                "choices": [c.record() for c in self.choices], "recommended": rec, "problem": self.problem}


def plan(cfg: Config, gpus: int, gpu_memory_gb: float, cpu_memory_gb: Optional[float] = None,
         gpus_per_host: Optional[int] = None, allowances: Allowances = Allowances(),
         choices: Optional[Sequence[Tuple[int, str, bool]]] = None) -> Plan:
    """Every choice (or the given ones) at its largest fitting micro batch, and the fastest that fits."""
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1 (got {gpus})")
    if not gpu_memory_gb > 0:
        raise UserError(f"--gpu-memory-gb must be > 0 (got {gpu_memory_gb})")
    if cpu_memory_gb is not None and not cpu_memory_gb > 0:
        raise UserError(f"--cpu-memory-gb must be > 0 (got {cpu_memory_gb})")
    per_host = min(gpus, 8) if gpus_per_host is None else gpus_per_host
    if per_host < 1:
        raise UserError(f"--gpus-per-host must be >= 1 (got {per_host})")
    if allowances.fragmentation < 0 or allowances.gpu_reserved_gb < 0 or allowances.host_process_gb < 0:
        raise UserError(f"the allowances must be >= 0 (got {dataclasses.asdict(allowances)})")
    precision, half_weights = _precision_facts(cfg)
    facts = model_facts(cfg)
    global_batch = cfg.train.global_batch_size
    problem = None
    candidates = [b for b in micro_batch_candidates(cfg) if global_batch % (b * gpus) == 0]
    if not candidates:
        problem = (f"train.global_batch_size {global_batch} is not a multiple of {gpus} GPUs x any micro batch "
                   f"<= train.micro_batch_size {cfg.train.micro_batch_size}; set train.global_batch_size to a "
                   f"multiple of {gpus} (e.g. {max(gpus, global_batch // gpus * gpus)}) or use another --gpus")
        candidates = micro_batch_candidates(cfg)
    fits_by_ckpt = {}
    out: List[Choice] = []
    for stage, offload, ckpt in (choices or enumerate_choices()):
        if ckpt not in fits_by_ckpt:
            fits_by_ckpt[ckpt] = activation_fit(cfg, ckpt, precision, half_weights)
        fit = fits_by_ckpt[ckpt]
        chosen = None
        for b in candidates:  # largest first
            g, h, gb, hb = estimate(cfg, facts, fit, gpus=gpus, gpus_per_host=per_host, zero_stage=stage,
                                    offload=offload, micro_batch=b, allowances=allowances)
            fits_gpu = g <= gpu_memory_gb * GIB
            fits_host = cpu_memory_gb is None or h <= cpu_memory_gb * GIB
            chosen = (b, g, h, gb, hb, fits_gpu, fits_host)
            if fits_gpu and fits_host:
                break
        b, g, h, gb, hb, fits_gpu, fits_host = chosen
        accumulation = global_batch // (b * gpus) if global_batch % (b * gpus) == 0 else None
        out.append(Choice(zero_stage=stage, offload=offload, activation_checkpointing=ckpt, micro_batch=b,
                          per_gpu_gb=round(g / GIB, 2), per_host_gb=round(h / GIB, 2),
                          fits=fits_gpu and fits_host and accumulation is not None, fits_gpu=fits_gpu,
                          fits_host=fits_host, accumulation_steps=accumulation,
                          gpu_breakdown_gb={k: round(v, 3) for k, v in gb.items()},
                          host_breakdown_gb={k: round(v, 3) for k, v in hb.items()}))
    fitting = [c for c in out if c.fits]
    recommended = min(fitting, key=lambda c: (speed_rank(c.zero_stage, c.offload, c.activation_checkpointing),
                                              -c.micro_batch)) if fitting else None
    if recommended is None and problem is None:
        problem = (f"no choice fits {gpus} GPU(s) of {gpu_memory_gb:g} GB"
                   + (f" and {cpu_memory_gb:g} GB of host memory per host" if cpu_memory_gb is not None else "")
                   + " even at micro batch 1; use more GPUs")
    return Plan(model_params=facts.params, precision=precision, half_weights=half_weights, gpus=gpus,
                gpus_per_host=per_host, gpu_memory_gb=gpu_memory_gb, cpu_memory_gb=cpu_memory_gb,
                global_batch_size=global_batch, choices=out, recommended=recommended, problem=problem,
                allowances=allowances,
                activation_fits={("checkpointing" if k else "no_checkpointing"): v for k, v in fits_by_ckpt.items()},
                engine_mode=cfg.engine.mode)


# ----------------------------------------------------------------------------------------------
# train.py's preflight

def _config_choice(cfg: Config) -> Tuple[int, str, int]:
    """(ZeRO stage, offload, checkpointing block interval) of the config; engine.offload and
    engine.activation_checkpointing are read where the config has them."""
    offload = getattr(cfg.engine, "offload", "none")
    every = _checkpoint_every(getattr(cfg.engine, "activation_checkpointing", False))
    return cfg.engine.zero_stage, offload, every


def _describe_checkpointing(every: int) -> str:
    return {0: "off", 1: "every block"}.get(every, f"every {every}th block")


def check_fits(cfg: Config, world_size: int, gpu_memory_gb: float, gpus_per_host: Optional[int] = None,
               cpu_memory_gb: Optional[float] = None, command: str = "simmim-fast plan --config CFG") -> Choice:
    """The estimate for the config's own choice (ZeRO stage, offload, checkpointing, micro batch) on
    ``world_size`` GPUs of ``gpu_memory_gb``; raises UserError naming the options to change if it
    cannot fit. Returns the estimate otherwise."""
    stage, offload, every = _config_choice(cfg)
    ckpt = bool(every)
    if cfg.engine.mode == "torch":
        offload = "none"  # no ZeRO offload in plain PyTorch
    precision, half_weights = _precision_facts(cfg)
    facts = model_facts(cfg)
    per_host = gpus_per_host or min(world_size, 8)
    fit = activation_fit(cfg, every, precision, half_weights)
    b = cfg.train.micro_batch_size
    g, h, gb, hb = estimate(cfg, facts, fit, gpus=world_size, gpus_per_host=per_host, zero_stage=stage,
                            offload=offload, micro_batch=b)
    fits_gpu = g <= gpu_memory_gb * GIB
    fits_host = cpu_memory_gb is None or h <= cpu_memory_gb * GIB
    own = Choice(zero_stage=stage, offload=offload, activation_checkpointing=ckpt, micro_batch=b,
                 per_gpu_gb=round(g / GIB, 2), per_host_gb=round(h / GIB, 2), fits=fits_gpu and fits_host,
                 fits_gpu=fits_gpu, fits_host=fits_host, accumulation_steps=None, gpu_breakdown_gb=gb,
                 host_breakdown_gb=hb)
    if own.fits:
        return own
    what = (f"about {own.per_gpu_gb:g} GB per GPU, the GPUs have {gpu_memory_gb:.1f} GB" if not fits_gpu else
            f"about {own.per_host_gb:g} GB of host memory per host, the host has {cpu_memory_gb:.1f} GB")
    better = plan(cfg, world_size, gpu_memory_gb, cpu_memory_gb, per_host)
    hint = f"`{command} --gpus {world_size} --gpu-memory-gb {gpu_memory_gb:.0f}` lists every choice"
    if better.recommended is None:
        raise UserError(f"this config cannot fit on {world_size} GPU(s): ZeRO-{stage}, offload {offload}, "
                        f"checkpointing {_describe_checkpointing(every)}, micro batch {b} needs {what}, and no ZeRO stage x offload x "
                        f"checkpointing choice fits ({better.problem}); {hint}")
    rec = better.recommended
    current = {f"engine.zero_stage={stage}", f"train.micro_batch_size={b}"}
    if offload != "none":
        current.add(f'engine.offload="{offload}"')
    if every == 1:
        current.add("engine.activation_checkpointing=true")
    changes = [s for s in rec.settings(cfg.engine.mode) if s not in current]
    if not rec.activation_checkpointing and ckpt:
        changes.append("engine.activation_checkpointing=false")
    if rec.offload == "none" and offload != "none":
        changes.append('engine.offload="none"')
    raise UserError(f"this config does not fit on {world_size} GPU(s): ZeRO-{stage}, offload {offload}, checkpointing "
                    f"{_describe_checkpointing(every)}, micro batch {b} needs {what}; set "
                    + " ".join(f"--set {c}" for c in changes) + f" (about {rec.per_gpu_gb:g} GB per GPU; {hint})")


def preflight_memory(cfg: Config, config_path: Optional[str] = None) -> Optional[Choice]:
    """train.py: on CUDA, refuse a config that cannot fit on the GPUs this run got, before the process
    group, the engine or the model allocate anything. Does nothing on the CPU."""
    if not torch.cuda.is_available():
        return None
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, torch.cuda.device_count()) or 1))
    props = torch.cuda.get_device_properties(local % max(torch.cuda.device_count(), 1))
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return check_fits(cfg, world, props.total_memory / GIB, per_host, host_gb,
                      command=f"simmim-fast plan --config {config_path or 'CFG'}")


# ----------------------------------------------------------------------------------------------
# The command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks) in the run")
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of each GPU in GB (2^30 bytes)")
    parser.add_argument("--cpu-memory-gb", type=float, default=None,
                        help="host memory per machine in GB; omitted: host memory is reported, not checked")
    parser.add_argument("--gpus-per-host", type=int, default=None, help="GPUs per machine (default min(--gpus, 8))")
    parser.add_argument("--fragmentation", type=float, default=FRAGMENTATION,
                        help="allocator fragmentation allowance, a fraction of the allocated bytes "
                             f"(default {FRAGMENTATION})")
    parser.add_argument("--gpu-reserved-gb", type=float, default=GPU_RESERVED_GB,
                        help="per-GPU memory outside the allocator: CUDA context, workspaces "
                             f"(default {GPU_RESERVED_GB})")
    parser.add_argument("--host-process-gb", type=float, default=HOST_PROCESS_GB,
                        help=f"host memory of one rank's process besides the model (default {HOST_PROCESS_GB})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def format_table(p: Plan) -> str:
    lines = [f"model: {p.model_params / 1e6:,.1f}M parameters; precision {p.precision}"
             f"{' (half-precision weights)' if p.half_weights else ' (fp32 weights, autocast)'}; "
             f"{p.gpus} GPU(s) x {p.gpu_memory_gb:g} GB, {p.gpus_per_host} per host"
             + (f", {p.cpu_memory_gb:g} GB host memory" if p.cpu_memory_gb is not None else
                ", host memory not checked (--cpu-memory-gb)")
             + f"; global batch {p.global_batch_size}",
             f"allowances: fragmentation {p.allowances.fragmentation:.0%} of allocated, "
             f"{p.allowances.gpu_reserved_gb:g} GB reserved per GPU, {p.allowances.host_process_gb:g} GB per "
             f"process on the host (GB = 2^30 bytes)",
             "",
             "| ZeRO | offload | checkpointing | micro batch | accumulation | per GPU GB | per host GB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for c in p.choices:
        fit = "yes" if c.fits else ("no (GPU)" if not c.fits_gpu else "no (host)" if not c.fits_host else "no (batch)")
        mark = " **<- recommended**" if c is p.recommended else ""
        lines.append(f"| {c.zero_stage} | {c.offload} | {'every block' if c.activation_checkpointing else 'off'} | "
                     f"{c.micro_batch} | {c.accumulation_steps if c.accumulation_steps is not None else '-'} | "
                     f"{c.per_gpu_gb:.1f} | {c.per_host_gb:.1f} | {fit}{mark} |")
    lines.append("")
    if p.recommended is not None:
        r = p.recommended
        lines.append(f"recommended (fastest that fits: least offload, then no checkpointing, then the lowest ZeRO "
                     f"stage, then the largest micro batch): ZeRO-{r.zero_stage}, offload {r.offload}, "
                     f"checkpointing {'every block' if r.activation_checkpointing else 'off'}, micro batch "
                     f"{r.micro_batch} x {r.accumulation_steps} accumulation steps x {p.gpus} GPU(s) = global batch "
                     f"{p.global_batch_size}")
        lines.append("  " + " ".join(f"--set {s}" for s in r.settings(p.engine_mode)))
    if p.problem:
        lines.append(f"problem: {p.problem}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=args.overrides)
    allowances = Allowances(args.fragmentation, args.gpu_reserved_gb, args.host_process_gb)
    p = plan(cfg, args.gpus, args.gpu_memory_gb, args.cpu_memory_gb, args.gpus_per_host, allowances)
    if args.json:
        json.dump(p.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(p))
    return 0 if p.recommended is not None else 1
