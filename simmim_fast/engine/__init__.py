"""Training engine: DeepSpeed (ZeRO 0-3) or plain PyTorch, optimiser groups, lr schedule, checkpoints,
the trainer and the run assembly. A library that knows no SimMIM: jobs pass the model and the loader in.

Submodules import DeepSpeed only when a DeepSpeed engine is built (or a DeepSpeed checkpoint is read).
"""
from .checkpoint import read_model_state, resolve_checkpoint
from .optim import build_adamw, layer_id, layer_scale, param_groups
from .schedule import LRSchedule

__all__ = ["read_model_state", "resolve_checkpoint", "build_adamw", "layer_id", "layer_scale", "param_groups",
           "LRSchedule"]
