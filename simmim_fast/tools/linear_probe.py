"""``simmim-fast linear-probe``: a linear classifier on frozen, precomputed features.

As MAE: a BatchNorm without affine parameters (eps 1e-6) in front of the linear layer, which
normalises the features' scale per channel, trained with SGD (momentum 0.9) or AdamW and a cosine
schedule on features computed once (no augmentation: CPU-friendly and deterministic for a seed).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn as nn

from ..errors import UserError

__all__ = ["LinearProbe", "train_linear_probe", "add_arguments", "main"]


class LinearProbe(nn.Sequential):
    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, epochs: int = 30, batch_size: int = 256, lr: float = 0.1,
                       optimizer: str = "sgd", weight_decay: float = 0.0, seed: int = 0) -> float:
    """Train on (N, C) features and return the top-1 accuracy (percent) on the validation features."""
    if train_x.dim() != 2 or val_x.dim() != 2 or train_x.shape[1] != val_x.shape[1]:
        raise UserError(f"linear probe: features must be (N, C) and (M, C), got {tuple(train_x.shape)} and "
                         f"{tuple(val_x.shape)}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError(f"linear probe: epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], num_classes)
    if optimizer == "sgd":
        opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise UserError(f"linear probe: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    n = train_x.shape[0]
    steps_per_epoch = max(1, n // batch_size)   # whole batches: BatchNorm needs more than one sample
    total = epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    probe.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = loss_fn(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        pred = probe(val_x).argmax(dim=1)
    return 100.0 * (pred == val_y).float().mean().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .features import add_feature_arguments
    add_feature_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30, help="probe training epochs (default 30)")
    parser.add_argument("--probe-batch-size", type=int, default=256, help="probe batch size (default 256)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak lr, cosine to 0 (default 0.1; ~1e-3 for adamw)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--weight-decay", type=float, default=0.0)


def main(args: argparse.Namespace) -> int:
    from .features import features_from_args
    sets, num_classes = features_from_args(args)
    results = {}
    for name, (tx, ty, vx, vy) in sets.items():
        results[name] = train_linear_probe(tx, ty, vx, vy, num_classes, args.epochs, args.probe_batch_size,
                                           args.lr, args.optimizer, args.weight_decay, args.seed)
        print(f"linear probe features={name}: top-1 {results[name]:.2f}% ({len(vy)} val, {len(ty)} train)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metric": "linear_probe_top1", "top1": results}, f, indent=2)
    return 0
