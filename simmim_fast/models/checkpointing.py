"""Activation checkpointing of transformer blocks (``engine.activation_checkpointing``).

A checkpointed block keeps only its input during the forward pass and runs its forward again in the
backward pass to rebuild what the gradients need: the activation memory of a block is traded for
one more forward of it. ``torch.utils.checkpoint`` in its non-reentrant form is used (it works with
torch.compile, with DeepSpeed ZeRO-3's parameter hooks, and with keyword arguments), with
``preserve_rng_state``: the recomputed forward restores the RNG state the first forward saw, so
drop path (stochastic depth) drops the same samples both times and the gradients are those of the
forward that produced the loss.

Which blocks: ``every`` = 0 none, 1 all, N every N-th block, i.e. blocks 0, N, 2N, ... counted
over all stages in forward order. Outside autograd (eval, ``torch.no_grad``) nothing is checkpointed.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_every", "run_block", "forward_swin_stages"]


def checkpoint_every(setting: Union[bool, int]) -> int:
    """The config value (false / true / N >= 1) as the block period: 0 = off, 1 = every block, N."""
    if setting is True:
        return 1
    if setting is False or setting is None:
        return 0
    if isinstance(setting, int) and setting >= 0:
        return setting
    raise ValueError(f"activation checkpointing must be false, true or an int >= 1, got {setting!r}")


def is_checkpointed(index: int, every: int) -> bool:
    return every > 0 and index % every == 0


def run_block(block: nn.Module, index: int, every: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``block(x, **kwargs)``, checkpointed when block ``index`` is one of every ``every``-th."""
    if is_checkpointed(index, every) and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return block(x, **kwargs)


def forward_swin_stages(stages: nn.Sequential, x: torch.Tensor, every: int) -> torch.Tensor:
    """timm Swin / SwinV2 stages: ``stages(x)`` without checkpointing; with it, stage by stage (patch
    merging first, then the blocks, as timm's stage forward) and block by block, so that each block
    can be checkpointed on its own."""
    if not every:
        return stages(x)
    index = 0
    for stage in stages:
        x = stage.downsample(x)
        for block in stage.blocks:
            x = run_block(block, index, every, x)
            index += 1
    return x
