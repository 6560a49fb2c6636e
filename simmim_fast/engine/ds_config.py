"""The DeepSpeed config, derived from our Config (users never write a second file).

Batch sizes, accumulation, clipping, ZeRO stage and precision come from the train and engine
sections; ``engine.deepspeed`` is merged on top key by key, so any DeepSpeed option can still be
set (e.g. ``--set engine.deepspeed='{"zero_optimization": {"stage3_prefetch_bucket_size": 1e8}}'``).
The optimiser and the lr schedule are ours (a client optimiser; lr set per step), never DeepSpeed's.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from ..config import Config

__all__ = ["resolve_precision", "uses_autocast", "deepspeed_config", "offload_config", "engine_clips_gradients",
           "merge_dicts"]


def resolve_precision(cfg: Config, device_type: str) -> str:
    """'auto' -> bf16 on CUDA, fp32 on the CPU (CPU bf16 autocast is several times slower than fp32)."""
    p = cfg.engine.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return p


def uses_autocast(precision: str) -> bool:
    """Autocast runs around the forward for bf16 and fp16, also when DeepSpeed holds half-precision weights:
    then autocast's weight casts are no-ops, the fp32 input images stay fp32 as the loss target, and
    LayerNorm/softmax/loss still run in fp32 as they do with fp32 weights."""
    return precision != "fp32"


def merge_dicts(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def engine_clips_gradients(cfg: Config, precision: str) -> bool:
    """ZeRO-0 with fp32 weights: the engine clips with torch's multi-tensor clip_grad_norm_ instead of
    DeepSpeed's per-parameter norms (one small kernel per parameter and a host sync)."""
    half_weights = precision == "fp16" or (precision == "bf16" and cfg.engine.bf16_weights)
    return cfg.engine.zero_stage == 0 and not half_weights and bool(cfg.train.clip_grad)


def offload_config(cfg: Config, pin_memory: Optional[bool] = None) -> Dict[str, Any]:
    """zero_optimization.offload_optimizer / offload_param for engine.offload (ZeRO-Offload / ZeRO-Infinity).

    The optimizer offload keeps the fp32 master weights, gradients' fp32 copies and Adam states on the CPU
    (or NVMe) and steps them there with DeepSpeed's CPU Adam; the parameter offload (ZeRO-3) also keeps the
    parameters there between uses. Pinned host memory (faster copies) only where there is CUDA to pin for.
    """
    e = cfg.engine
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    target: Dict[str, Any] = {"device": e.offload_device, "pin_memory": bool(pin_memory)}
    if e.offload_device == "nvme":
        target["nvme_path"] = e.nvme_path
    out = {"offload_optimizer": dict(target)}
    if e.offload == "optimizer_and_params":
        out["offload_param"] = dict(target)
    return out


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> Dict[str, Any]:
    t, e = cfg.train, cfg.engine
    stage = e.zero_stage
    overlap = e.overlap_comm
    if overlap == "auto":
        # With one rank there is nothing to overlap, and DeepSpeed's overlap path synchronises the whole
        # device at every bucket, which stops the host from running ahead of the GPU.
        overlap = world_size > 1 and stage >= 2
    zero: Dict[str, Any] = {"stage": stage, "overlap_comm": bool(overlap), "contiguous_gradients": stage >= 2,
                            "reduce_bucket_size": e.reduce_bucket_size, "reduce_scatter": True}
    if stage in (1, 2):
        zero["allgather_bucket_size"] = e.allgather_bucket_size
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": e.reduce_bucket_size,
                     "stage3_param_persistence_threshold": 100_000,
                     # The model is saved consolidated by load_model_state from the ZeRO shards instead.
                     "stage3_gather_16bit_weights_on_model_save": False})
    if e.offload != "none":
        zero.update(offload_config(cfg))
    ds: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.accumulation_steps(world_size),
        "gradient_clipping": float(t.clip_grad) if t.clip_grad and not engine_clips_gradients(cfg, precision) else 0.0,
        "zero_optimization": zero,
        # ZeRO wraps a client optimiser it has not tested; torch's AdamW is the one we pass.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16" and e.bf16_weights},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1 << 30,          # our logger reports; DeepSpeed's would sync the device
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "bf16" and e.bf16_weights and stage == 1:
        # ZeRO-1: accumulate micro-batch gradients in fp32 (DeepSpeed's BF16_Optimizer); bf16 accumulation
        # loses bits over many micro-batches. DeepSpeed supports this only at stage 1.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return merge_dicts(ds, e.deepspeed)
