"""``simmim-fast knn``: weighted k-nearest-neighbour top-1 on frozen features.

The InstDisc / DINO protocol: features L2-normalised, cosine similarity, the k most similar
training samples vote for their class with weight exp(similarity / T); k = 20, T = 0.07.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["knn_predict", "knn_top1", "add_arguments", "main"]


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(Q,) predicted classes for (Q, C) queries from (N, C) training features and (N,) labels."""
    if train_x.dim() != 2 or query_x.dim() != 2 or train_x.shape[1] != query_x.shape[1]:
        raise UserError(f"knn: features must be (N, C) and (Q, C), got {tuple(train_x.shape)} and "
                         f"{tuple(query_x.shape)}")
    if train_y.shape != (train_x.shape[0],):
        raise UserError(f"knn: labels {tuple(train_y.shape)} do not pair with features {tuple(train_x.shape)}")
    if not 1 <= k or not temperature > 0:
        raise UserError(f"knn: k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_x.shape[0])
    train = F.normalize(train_x.float(), dim=1)
    preds = []
    for q in F.normalize(query_x.float(), dim=1).split(chunk):
        sim, idx = (q @ train.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_x, train_y, val_x, val_y, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(train_x, train_y, val_x, num_classes, k, temperature)
    return 100.0 * (pred == val_y).float().mean().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .features import add_feature_arguments
    add_feature_arguments(parser)
    parser.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")


def main(args: argparse.Namespace) -> int:
    from .features import features_from_args
    sets, num_classes = features_from_args(args)
    results = {}
    for name, (tx, ty, vx, vy) in sets.items():
        results[name] = knn_top1(tx, ty, vx, vy, num_classes, args.k, args.temperature)
        print(f"knn k={args.k} T={args.temperature} features={name}: top-1 {results[name]:.2f}% "
              f"({len(vy)} val, {len(ty)} train)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metric": "knn_top1", "k": args.k, "temperature": args.temperature, "top1": results}, f, indent=2)
    return 0
