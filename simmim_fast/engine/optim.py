"""AdamW parameter groups: the official SimMIM no-decay rules and layer-wise lr decay (Swin and ViT).

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.9, model_cfg=cfg.model)
    opt = build_adamw(groups, cfg.train, device, impl="auto")

Each group carries ``lr_scale`` (multiplied into the scheduled lr every step) and ``group_name``.
Layer ids follow the official SimMIM fine-tuning code: 0 = patch embedding / mask token / position
embeddings, blocks 1..L in order, L + 1 = everything after the blocks (final norm, head); the lr scale
is ``layer_decay ** (L + 1 - id)``. Names may carry the SimMIM prefix ``encoder.`` or none (a bare
timm encoder or a classifier built on it).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Set

import torch
import torch.nn as nn

from ..config import ModelConfig, TrainConfig
from ..errors import UserError

__all__ = ["num_layers", "layer_id", "layer_scale", "is_no_decay", "param_groups", "build_adamw"]

_EMBED_NAMES = ("mask_token", "cls_token", "pos_embed", "absolute_pos_embed")
_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def num_layers(model_cfg: ModelConfig) -> int:
    """L: the number of transformer blocks (sum of the Swin stage depths, or the ViT depth)."""
    return sum(model_cfg.depths)


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "encoder."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def layer_id(name: str, model_cfg: ModelConfig) -> int:
    """Layer id of a parameter name for layer-wise lr decay (see the module docstring)."""
    n = _strip(name)
    last = num_layers(model_cfg) + 1
    if n in _EMBED_NAMES or n.startswith("patch_embed."):
        return 0
    if model_cfg.encoder in ("swin", "swinv2"):  # the same stage / block names in timm
        m = _SWIN_BLOCK.match(n)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            return sum(model_cfg.depths[:stage]) + block + 1
        m = _SWIN_DOWNSAMPLE.match(n)
        if m:
            # timm runs a stage's patch merging at its start; the official Swin runs the same module at
            # the end of the previous stage and gives it that stage's last block id.
            return sum(model_cfg.depths[:int(m.group(1))])
        return last
    m = _VIT_BLOCK.match(n)
    if m:
        return int(m.group(1)) + 1
    return last  # rel_pos_bias (shared), final norm, head: as the official get_vit_layer


def layer_scale(name: str, model_cfg: ModelConfig, layer_decay: float) -> float:
    return layer_decay ** (num_layers(model_cfg) + 1 - layer_id(name, model_cfg))


def is_no_decay(name: str, param: torch.Tensor, no_decay_names: Set[str], decay_names: Set[str] = frozenset()) -> bool:
    """1-D tensors, biases, the named ones (position embeddings, mask token) and relative position bias
    tables get no weight decay, except the ``decay_names``, which are always decayed. Both name sets
    without the ``encoder.`` prefix (see _strip)."""
    if _strip(name) in decay_names:
        return False
    return (param.ndim <= 1 or name.endswith(".bias") or _strip(name) in no_decay_names
            or "relative_position_bias_table" in name)


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: Optional[Iterable[str]] = None,
                 layer_decay: float = 1.0, model_cfg: Optional[ModelConfig] = None,
                 decay_names: Iterable[str] = ()) -> List[Dict]:
    """Optimizer param groups: (decay or not) x (layer id when layer_decay < 1).

    ``no_decay_names`` defaults to ``model.no_weight_decay()`` when the model has it. ``decay_names``
    are decayed whatever the other rules say (to reproduce runs that decayed them). ``model_cfg`` is
    needed for layer_decay < 1 (it gives the depths).
    """
    if not 0 < layer_decay <= 1:
        raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if layer_decay < 1 and model_cfg is None:
        raise UserError("param_groups: layer_decay < 1 needs model_cfg (the encoder depths)")
    if no_decay_names is None:
        no_decay_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip = {_strip(n) for n in no_decay_names}
    force = {_strip(n) for n in decay_names}
    groups: Dict[str, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not is_no_decay(name, p, skip, force)
        lid = layer_id(name, model_cfg) if layer_decay < 1 else None
        key = f"{'decay' if decay else 'no_decay'}" + (f"_layer{lid}" if lid is not None else "")
        if key not in groups:
            scale = layer_scale(name, model_cfg, layer_decay) if lid is not None else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
                           "group_name": key}
        groups[key]["params"].append(p)
    if not groups:
        raise UserError("param_groups: the model has no trainable parameters")
    return list(groups.values())


def _cpu_adam_bias_correction_from_the_step(optimizer, args, kwargs) -> None:
    """Make DeepSpeed's CPU Adam compute beta^step the same way in a resumed run as in an uninterrupted one.

    Its C++ state keeps beta1^t, beta2^t in fp32 and, when the step grows by one, multiplies them by beta
    once more; at any other step (the first after a resume) it takes pow(beta, step), which differs in the
    last bits from the product, so a resumed run's updates would drift from the uninterrupted run's. One
    update of a 1-element dummy at step 0 (lr 0, no bias correction) before every optimiser step resets
    that state, so every step takes pow(beta, step): a function of the step alone, resume or not.
    """
    dummy = [torch.zeros(1) for _ in range(4)]
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    optimizer.ds_opt_adam.adam_update(optimizer.opt_id, 0, 0.0, beta1, beta2, 1e-8, 0.0, False, *dummy)


def build_adamw(groups: List[Dict], train: TrainConfig, device: torch.device, impl: str = "auto"):
    """AdamW with the official SimMIM betas/eps; the lr is set per step by the schedule (times each group's lr_scale).

    'auto' = torch's fused CUDA kernel on CUDA (one multi-tensor kernel, no JIT build; DeepSpeed's FusedAdam
    does the same work), foreach on the CPU.
    """
    if impl == "auto":
        impl = "torch_fused" if device.type == "cuda" else "torch_foreach"
    kw = dict(lr=train.base_lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)
    if impl == "torch_fused":
        if device.type != "cuda":
            raise UserError("engine.optimizer 'torch_fused' needs CUDA; use 'auto' or 'torch_foreach' on the CPU")
        return torch.optim.AdamW(groups, fused=True, **kw)
    if impl == "torch_foreach":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if impl == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kw)
    if impl == "deepspeed_cpu":
        # ZeRO-Offload steps the offloaded fp32 master weights on the CPU; DeepSpeed JIT-builds this op
        # (C++, SIMD) with ninja into TORCH_EXTENSIONS_DIR on first use (docs/ENGINE.md).
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        opt.register_step_pre_hook(_cpu_adam_bias_correction_from_the_step)
        return opt
    raise UserError(f"engine.optimizer {impl!r} is not one of auto, torch_fused, torch_foreach, deepspeed_fused, "
                    f"deepspeed_cpu")
