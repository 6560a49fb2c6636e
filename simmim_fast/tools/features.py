"""Frozen-encoder features for kNN and linear probing.

- Swin / SwinV2: the last stage's output after the final LayerNorm, averaged over positions.
- ViT (timm Beit): patch tokens (cls dropped) averaged, after the final norm for the last block,
  and without a norm for an intermediate block (``block=k`` = output of the k-th block,
  1-based): masked-image-modeling features are often more linearly separable in the middle of
  the network, so the ViT tools report both.

The encoder runs in eval mode, without gradients and without a mask (the mask token is unused).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from ..errors import UserError
from ..models.vit import vit_forward_tokens

__all__ = ["pooled_features", "extract_features", "feature_sets", "default_vit_block", "add_feature_arguments",
           "features_from_args", "num_classes_of"]


def default_vit_block(depth: int) -> int:
    """The intermediate ViT block reported besides the last: two thirds of the way (8 of 12)."""
    return max(1, round(depth * 2 / 3))


@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """(B, in_chans, S, S) normalised images -> (B, C) average-pooled features (see the module doc)."""
    from timm.models.beit import Beit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    if isinstance(encoder, (SwinTransformer, SwinTransformerV2)):
        if block is not None:
            raise UserError("pooled_features: block is for ViT encoders; Swin features are the last stage's")
        return encoder.forward_features(images).mean(dim=(1, 2))
    if not isinstance(encoder, Beit):
        raise TypeError(f"pooled_features: expected a timm SwinTransformer or Beit encoder, got {type(encoder).__name__}")
    depth = len(encoder.blocks)
    if block is not None and not 1 <= block <= depth:
        raise UserError(f"pooled_features: block must be in [1, {depth}], got {block}")
    return vit_forward_tokens(encoder, encoder.patch_embed(images), block)[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, dataset: Dataset, blocks=(None,), batch_size: int = 128,
                     device: str | torch.device = "cpu", num_workers: int = 0) -> Tuple[Dict, torch.Tensor]:
    """({block: (N, C) float32 features}, (N,) labels) over a dataset of (image, label) pairs.

    One pass computes every requested ``blocks`` entry (None = the last / Swin)."""
    was_training = encoder.training
    encoder.eval().to(device)
    feats = {b: [] for b in blocks}
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dtype = next(encoder.parameters()).dtype  # half-precision weights (e.g. DeepSpeed bf16) take half inputs
    try:
        for images, y in loader:
            images = images.to(device, dtype, non_blocking=True)
            for b in blocks:
                feats[b].append(pooled_features(encoder, images, b).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        encoder.train(was_training)
    return {b: torch.cat(v) for b, v in feats.items()}, torch.cat(labels)


def feature_sets(encoder: torch.nn.Module, train: Dataset, val: Dataset, vit_block: Optional[int] = None,
                 batch_size: int = 128, device: str | torch.device = "cpu", num_workers: int = 0) -> Dict[str, tuple]:
    """{name: (train_x, train_y, val_x, val_y)}: 'last' and, for ViT, 'block<k>'."""
    from timm.models.beit import Beit
    blocks = [None]
    if isinstance(encoder, Beit):
        k = vit_block or default_vit_block(len(encoder.blocks))
        if k != len(encoder.blocks):
            blocks.append(k)
    tr, ty = extract_features(encoder, train, blocks, batch_size, device, num_workers)
    va, vy = extract_features(encoder, val, blocks, batch_size, device, num_workers)
    return {("last" if b is None else f"block{b}"): (tr[b], ty, va[b], vy) for b in blocks}


# --------------------------------------------------------------------------------------------
# Shared CLI arguments of knn and linear-probe

def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_weights_arguments
    add_weights_arguments(parser)
    parser.add_argument("--data", default="fashion-mnist",
                        help="'fashion-mnist' (optionally 'fashion-mnist:/idx/folder') or an ImageFolder root "
                             "with train/ and val/ (default: fashion-mnist)")
    parser.add_argument("--train-limit", type=int, help="use a seeded random subset of this many training images")
    parser.add_argument("--val-limit", type=int, help="use a seeded random subset of this many validation images")
    parser.add_argument("--vit-block", type=int, help="ViT: intermediate block also reported (1-based; default "
                                                      "two thirds of the depth)")
    parser.add_argument("--random-init", action="store_true",
                        help="ignore the weights: the same encoder with random init (the baseline)")
    parser.add_argument("--batch-size", type=int, default=128, help="feature extraction batch size")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets (and of --random-init)")
    parser.add_argument("--json", help="also write the results to this JSON file")


def features_from_args(args: argparse.Namespace) -> Tuple[Dict[str, tuple], int]:
    from .eval_data import eval_datasets
    from ..weights import build_simmim, load_source
    cfg, state = load_source(args.checkpoint, args.config, args.overrides)
    torch.manual_seed(args.seed)
    model = build_simmim(cfg, None if args.random_init else state)
    # model.in_chans and the normalisation come from the checkpoint's config (what it was trained with)
    train, val = eval_datasets(args.data, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                               args.train_limit, args.val_limit, args.seed, cfg.data.value_range)
    sets = feature_sets(model.encoder, train, val, args.vit_block, args.batch_size, args.device, args.workers)
    return sets, num_classes_of(sets)


def num_classes_of(sets: Dict[str, tuple]) -> int:
    """Classes of feature sets from ``feature_sets``: the largest training label + 1."""
    return int(max(int(s[1].max()) for s in sets.values()) + 1)
