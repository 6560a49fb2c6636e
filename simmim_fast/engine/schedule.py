"""The learning-rate schedule of the official SimMIM code, per optimiser step (official SimMIM semantics).

lr, warmup lr and min lr are each scaled by global batch / 512 (global batch = images per optimiser
step over all ranks and accumulation steps). Step s (0-based, the s-th optimiser update) uses

    warmup (s < W):  warmup_lr + (lr - warmup_lr) * s / W
    cosine:          min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
    multistep:       lr * decay_rate ** (number of decay epochs e with e * steps_per_epoch <= s)

with W = warmup_epochs * steps_per_epoch and T = epochs * steps_per_epoch. Each param group gets
lr(s) * its lr_scale (layer-wise decay). The schedule is a pure function of s, so a resumed run needs
only the step count.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import List

from ..config import TrainConfig

__all__ = ["LRSchedule"]


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    milestones: tuple = ()
    decay_rate: float = 0.1

    @classmethod
    def from_config(cls, train: TrainConfig, steps_per_epoch: int) -> "LRSchedule":
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        scale = train.global_batch_size / 512
        return cls(lr=train.base_lr * scale, warmup_lr=train.warmup_lr * scale, min_lr=train.min_lr * scale,
                   warmup_steps=train.warmup_epochs * steps_per_epoch, total_steps=train.epochs * steps_per_epoch,
                   kind=train.lr_scheduler, milestones=tuple(e * steps_per_epoch for e in train.decay_epochs),
                   decay_rate=train.decay_rate)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "cosine":
            span = self.total_steps - self.warmup_steps
            t = min(step - self.warmup_steps, span)
            if span == 0:
                return self.min_lr
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t / span))
        if self.kind == "multistep":
            return self.lr * self.decay_rate ** bisect.bisect_right(self.milestones, step)
        raise ValueError(f"train.lr_scheduler {self.kind!r} is not 'cosine' or 'multistep'")

    def values(self, steps: List[int]) -> List[float]:
        return [self(s) for s in steps]
