"""Training engine: DeepSpeed (ZeRO 0-3) or plain PyTorch, optimiser groups, lr schedule, checkpoints.

Submodules import DeepSpeed only when a DeepSpeed engine is built, so ``simmim_fast.engine.optim`` and
``simmim_fast.engine.schedule`` (used by fine-tuning) and ``load_model_state`` for torch-mode checkpoints
work without it.
"""
from .checkpoint import load_model_state, resolve_checkpoint
from .optim import build_adamw, layer_id, layer_scale, param_groups
from .schedule import LRSchedule

__all__ = ["load_model_state", "resolve_checkpoint", "build_adamw", "layer_id", "layer_scale", "param_groups",
           "LRSchedule"]
