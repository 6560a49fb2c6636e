"""Two ways to run one optimiser step, with one interface: DeepSpeed (ZeRO 0-3) and plain PyTorch/DDP.

    backend.train_step(micro_batches, lr) -> StepResult
    backend.write_state(dir) / backend.read_state(dir)      # checkpoint payload, all ranks call

The model's forward (through ``loss_fn(module, batch)``) returns the scalar loss; everything
method-specific stays with the caller, so fine-tuning can reuse the same engine.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..config import Config
from .ds_config import deepspeed_config, engine_clips_gradients, uses_autocast
from .dist import DistInfo
from .optim import build_adamw

__all__ = ["StepResult", "DeepSpeedBackend", "TorchBackend", "build_backend", "default_loss_fn", "want_compile"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
    return module(*batch) if isinstance(batch, (tuple, list)) else module(batch)


@dataclass
class StepResult:
    loss: torch.Tensor                 # mean micro-batch loss of this rank, detached, on the device
    grad_norm: Optional[torch.Tensor]  # before clipping; None where the engine does not report it
    applied: Optional[bool]            # False if the update was skipped; None if not checked (no sync)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _dtype(precision: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def want_compile(cfg: Config, device: torch.device) -> bool:
    """engine.compile 'auto': on with CUDA, except at ZeRO-3, whose per-module parameter hooks split the graph
    at every module: torch.compile then spends minutes on many small graphs and fuses nothing (docs/ENGINE.md).
    true forces it (engine.compile() works at ZeRO-3), false turns it off."""
    c = cfg.engine.compile
    if c == "auto":
        return device.type == "cuda" and not (cfg.engine.mode == "deepspeed" and cfg.engine.zero_stage == 3)
    return bool(c)


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, model: nn.Module, groups: List[Dict], cfg: Config, dist: DistInfo, precision: str,
                 loss_fn: LossFn = default_loss_fn):
        import deepspeed

        self.cfg, self.dist, self.precision, self.loss_fn = cfg, dist, precision, loss_fn
        self.ds_config = deepspeed_config(cfg, dist.world_size, precision)
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.autocast_dtype = _dtype(precision) if uses_autocast(precision) else None
        # An offloaded optimizer steps on the CPU: DeepSpeed's CPU Adam (DeepSpeed refuses other client
        # optimizers there, zero_force_ds_cpu_optimizer).
        impl = "deepspeed_cpu" if cfg.engine.offload != "none" else cfg.engine.optimizer
        optimizer = build_adamw(groups, cfg.train, dist.device, impl)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model.to(dist.device), optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        # ZeRO-0, fp32 weights: we clip (see engine_clips_gradients); the user may still force DeepSpeed's.
        self.clip = cfg.train.clip_grad if (engine_clips_gradients(cfg, precision)
                                            and not self.ds_config["gradient_clipping"]) else None
        if self.ds_config["zero_optimization"]["stage"] == 0 and dist.world_size == 1:
            # One rank: DeepSpeed's ZeRO-0 all-reduce would flatten every gradient into a buffer, "reduce" it
            # with itself and copy it back, two full passes over the gradients for nothing.
            self.engine.enable_backward_allreduce = False
        self.compiled = want_compile(cfg, dist.device)
        if self.compiled:
            self.engine.compile()  # DeepSpeed's own entry: works at ZeRO-3, where torch.compile(model) does not

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        # The basic (client) optimiser is the one that steps, whatever ZeRO/bf16 wrapper sits around it.
        for g in self.engine.basic_optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def train_step(self, micro_batches: Iterable[Any], lr: float) -> StepResult:
        self.set_lr(lr)
        losses = []
        norm = None
        for batch in micro_batches:
            with _autocast(self.dist.device, self.autocast_dtype):
                loss = self.loss_fn(self.engine, batch)
            self.engine.backward(loss)
            if self.clip and self.engine.is_gradient_accumulation_boundary():
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.engine.module.parameters() if p.grad is not None], self.clip, foreach=True)
            self.engine.step()  # counts micro-steps; the update happens at the accumulation boundary
            losses.append(loss.detach().float())
        if len(losses) != self.accumulation:
            raise RuntimeError(f"train_step got {len(losses)} micro-batches, expected {self.accumulation}")
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is not None and not torch.is_tensor(norm):
            norm = torch.tensor(float(norm))
        applied = self.engine.was_step_applied()
        return StepResult(torch.stack(losses).mean(), norm, applied)

    def write_state(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag="deepspeed", client_state={}, save_latest=False)

    def read_state(self, ckpt_dir: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir / 'deepspeed'}")

    def engine_facts(self) -> Dict[str, Any]:
        return {"mode": "deepspeed", "zero_stage": self.ds_config["zero_optimization"]["stage"],
                "offload": self.cfg.engine.offload,
                "precision": self.precision, "bf16_weights": bool(self.ds_config["bf16"]["enabled"]),
                "world_size": self.dist.world_size, "accumulation_steps": self.accumulation}


class TorchBackend:
    """Plain PyTorch (DDP with more than one rank): the yardstick the DeepSpeed path is measured against."""
    name = "torch"

    def __init__(self, model: nn.Module, groups: List[Dict], cfg: Config, dist: DistInfo, precision: str,
                 loss_fn: LossFn = default_loss_fn):
        self.cfg, self.dist, self.precision, self.loss_fn = cfg, dist, precision, loss_fn
        self.accumulation = cfg.train.accumulation_steps(dist.world_size)
        self.raw = model.to(dist.device)
        self.optimizer = build_adamw(groups, cfg.train, dist.device, cfg.engine.optimizer)
        self.autocast_dtype = _dtype(precision)
        self.scaler = torch.amp.GradScaler(dist.device.type) if precision == "fp16" else None
        self.clip = cfg.train.clip_grad
        net: nn.Module = self.raw
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.compiled = want_compile(cfg, dist.device)
        self.net = torch.compile(net) if self.compiled else net
        self.ddp = net if dist.world_size > 1 else None
        self.check_finite = False

    @property
    def module(self) -> nn.Module:
        return self.raw

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def train_step(self, micro_batches: Iterable[Any], lr: float) -> StepResult:
        self.set_lr(lr)
        losses = []
        batches = list(micro_batches) if self.ddp is not None else micro_batches
        for i, batch in enumerate(batches):
            last = self.ddp is None or i == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with sync:
                with _autocast(self.dist.device, self.autocast_dtype):
                    loss = self.loss_fn(self.net, batch)
                scaled = loss / self.accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.detach().float())
        if len(losses) != self.accumulation:
            raise RuntimeError(f"train_step got {len(losses)} micro-batches, expected {self.accumulation}")
        mean = torch.stack(losses).mean()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        applied: Optional[bool] = None
        if self.check_finite:  # nan_policy 'skip': one host sync per step decides
            total = mean.clone()
            if self.dist.world_size > 1:
                torch.distributed.all_reduce(total)
            applied = bool(torch.isfinite(total).item() and torch.isfinite(norm).item())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif applied is not False:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(mean, norm.detach(), applied)

    def write_state(self, ckpt_dir: Path) -> None:
        if self.dist.rank == 0:
            torch.save(self.raw.state_dict(), ckpt_dir / "model.pt")
            opt = {"optimizer": self.optimizer.state_dict()}
            if self.scaler:
                opt["scaler"] = self.scaler.state_dict()
            torch.save(opt, ckpt_dir / "optimizer.pt")

    def read_state(self, ckpt_dir: Path) -> None:
        self.raw.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location=self.dist.device, weights_only=True))
        opt = torch.load(ckpt_dir / "optimizer.pt", map_location=self.dist.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        if self.scaler and "scaler" in opt:
            self.scaler.load_state_dict(opt["scaler"])

    def engine_facts(self) -> Dict[str, Any]:
        return {"mode": "torch", "zero_stage": 0, "precision": self.precision, "bf16_weights": False,
                "world_size": self.dist.world_size, "accumulation_steps": self.accumulation}


def build_backend(model: nn.Module, groups: List[Dict], cfg: Config, dist: DistInfo, precision: str,
                  loss_fn: LossFn = default_loss_fn):
    cls = DeepSpeedBackend if cfg.engine.mode == "deepspeed" else TorchBackend
    return cls(model, groups, cfg, dist, precision, loss_fn)
