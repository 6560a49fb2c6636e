"""What each step of an epoch holds: sample slots, the files read for them, and their views.

The plan is a pure function of (train.seed, epoch, step, rank, world size) and of which files are
bad, so every backend loads the same samples with the same crops and flips, and an epoch
restarted at any step reproduces the uninterrupted one from that step on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..config import DataConfig
from .index import FileResolver, ImageIndex
from .views import Views, sample_views

__all__ = ["epoch_order", "StepPlan", "Planner"]


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> List[int]:
    """This rank's sample indices for an epoch: a seeded permutation, sharded, whole batches only.

    Every rank gets the same number of batches; the samples that do not fill a whole global batch
    are dropped for this epoch (a different set each epoch).
    """
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
    per_rank = (num_samples // world_size) // batch_size * batch_size
    return perm[rank:per_rank * world_size:world_size].tolist()


@dataclass(frozen=True)
class StepPlan:
    epoch: int
    step: int
    slots: np.ndarray   # dataset indices of the batch's samples (they key the random views)
    files: np.ndarray   # files actually read: the slot itself, or its stand-in if that file is bad
    views: Views        # crop box and flip of each sample, for the file actually read


class Planner:
    """Plans steps for one rank; shared by the loader and its backend (which reports bad files)."""

    def __init__(self, index: ImageIndex, data: DataConfig, seed: int, rank: int, world_size: int, batch_size: int):
        self.index, self.data = index, data
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.resolver = FileResolver(index, seed)
        self._order: Optional[Tuple[int, np.ndarray]] = None

    @property
    def micro_batches_per_epoch(self) -> int:
        return (len(self.index) // self.world_size) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.asarray(epoch_order(len(self.index), self.seed, epoch, self.rank,
                                                         self.world_size, self.batch_size), dtype=np.int64))
        return self._order[1]

    def slots(self, epoch: int, step: int) -> np.ndarray:
        b = self.batch_size
        return self.order(epoch)[step * b:(step + 1) * b]

    def plan(self, epoch: int, step: int) -> StepPlan:
        slots = self.slots(epoch, step)
        files = self.resolver.resolve(slots)
        d = self.data
        views = sample_views(self.seed, epoch, slots, self.index.width[files], self.index.height[files],
                             d.crop_scale, d.crop_ratio, d.hflip_prob, d.vflip_prob, d.rot90)
        return StepPlan(epoch, step, slots, files, views)

    def report_bad(self, file: int, reason: str) -> None:
        self.resolver.mark_bad(file, reason)
