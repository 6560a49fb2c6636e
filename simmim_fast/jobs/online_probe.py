"""The online kNN probe of pretraining (``logging.probe``): every ``every_steps`` optimiser steps, the
frozen encoder's features of a labelled set and the ``knn`` tool's weighted kNN top-1 on them.

It is the ``knn`` tool's computation (``tools.features.feature_sets`` + ``tools.knn.knn_top1``, the same
datasets and seeded subsets as ``simmim-fast knn CKPT --data D --train-limit N --val-limit M --seed S``),
so the logged value equals that command run on the checkpoint of the same step. It leaves training
as it found it: every RNG stream (python, numpy, torch, CUDA) is saved before and restored after
(a DataLoader draws its seed from torch's generator), the model goes to eval mode without gradients
and back to its mode, and nothing of the optimiser or the data order is touched, so per-step losses
and a kill -9 + resume are bit-identical with and without it.

Rank 0 runs it alone (the others wait at the next step's collectives); at ZeRO-3, whose parameters
are partitioned and fetched by collective hooks around each submodule's forward, every rank runs it
(the same passes and result everywhere).
Cost: one forward pass over train_limit + val_limit images per probe, reported as probe/seconds.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch

from ..config import Config
from ..engine.run import RunContext
from ..engine.checkpoint import capture_rng, restore_rng
from ..engine.trainer import TrainState
from ..errors import UserError
from ..tools.eval_data import check_eval_data, eval_datasets
from ..tools.features import feature_sets, num_classes_of
from ..tools.knn import knn_top1

__all__ = ["OnlineProbe", "check_probe_config", "online_probe_callback"]


def check_probe_config(cfg: Config) -> None:
    """Before any heavy work: the probe's data is there and fits the model."""
    p = cfg.logging.probe
    if p.data is None:
        return
    if cfg.model.in_chans != 3:
        raise UserError(f"config key 'logging.probe.data' = {p.data!r}: the probe's datasets give RGB images, "
                        f"but model.in_chans = {cfg.model.in_chans}; set logging.probe.data=null")
    check_eval_data(p.data, "logging.probe.data")


class OnlineProbe:
    """``probe(model)`` -> {"probe/knn_top1": %, ["probe/knn_top1_block<k>": %,] "probe/seconds": s} for
    a SimMIM model (its ``encoder`` is probed)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.p = cfg.logging.probe
        self.device = device
        self.train, self.val = eval_datasets(self.p.data, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                                             self.p.train_limit, self.p.val_limit, self.p.seed)

    def __call__(self, model: torch.nn.Module) -> Dict[str, float]:
        p = self.p
        t0 = time.perf_counter()
        rng = capture_rng()
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                sets = feature_sets(model.encoder, self.train, self.val, p.vit_block, p.batch_size, self.device,
                                    p.num_workers)
            num_classes = num_classes_of(sets)
            result = {("probe/knn_top1" if name == "last" else f"probe/knn_top1_{name}"):
                      knn_top1(tx, ty, vx, vy, num_classes, p.k, p.temperature)
                      for name, (tx, ty, vx, vy) in sets.items()}
        finally:
            model.train(was_training)
            restore_rng(rng)
        result["probe/seconds"] = round(time.perf_counter() - t0, 3)
        return result


def online_probe_callback(ctx: RunContext) -> Optional[Callable[[TrainState], Optional[Dict]]]:
    """The engine's on_step hook for logging.probe (None when the probe is off)."""
    cfg, dist = ctx.cfg, ctx.dist
    p = cfg.logging.probe
    if p.data is None:
        return None
    every_rank = cfg.engine.mode == "deepspeed" and cfg.engine.zero_stage == 3
    probe = OnlineProbe(cfg, dist.device) if dist.is_main or every_rank else None
    if dist.is_main:
        print(f"online probe: kNN (k {p.k}, T {p.temperature}) on {p.data}, {len(probe.train)} train / "
              f"{len(probe.val)} val images, every {p.every_steps} steps", flush=True)

    def callback(state: TrainState) -> Optional[Dict[str, float]]:
        if state.step % p.every_steps:
            return None
        # At ZeRO-3 every rank runs the same forward passes: the engine's hooks fetch and release each
        # submodule's partitioned parameters around its forward, collectively (as finetune's evaluation).
        result = probe(ctx.backend.module) if probe is not None else {}
        if not dist.is_main:
            return {}  # the step's record is flushed on every rank; only rank 0 logs
        ctx.logger.message(f"probe step {state.step}: " + ", ".join(
            f"{k[len('probe/'):]} {v:.2f}" for k, v in result.items() if k != "probe/seconds")
            + f" ({result['probe/seconds']:.1f} s per probe)")
        return result
    return callback
