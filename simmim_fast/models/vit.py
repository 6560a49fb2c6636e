"""ViT encoder for SimMIM: timm's BEiT-style ViT (``Beit``) in the SimMIM variant.

No absolute position embedding, one relative position bias shared by all blocks, layer scale,
LayerNorm eps 1e-6, qkv bias. The mask token replaces patch embeddings before the cls token is
prepended; the cls token is dropped at the output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.models.beit import Beit

from ..config import ModelConfig
from .checkpointing import run_block

__all__ = ["create_vit", "vit_forward_masked"]


def create_vit(cfg: ModelConfig) -> Beit:
    return Beit(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        global_pool="token", use_fc_norm=False,  # keep the final norm: the head reads every token
        embed_dim=cfg.embed_dim, depth=cfg.depths[0], num_heads=cfg.num_heads[0], mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
        init_values=cfg.layer_scale_init or None,
        use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


def vit_forward_tokens(encoder: Beit, x: torch.Tensor, num_blocks: Optional[int] = None,
                       checkpoint_every: int = 0) -> torch.Tensor:
    """(B, L, C) patch tokens -> (B, 1 + L, C) after the cls token, the first ``num_blocks`` blocks
    (all by default) with the shared relative position bias, and the final norm after the last block.
    ``checkpoint_every``: activation checkpointing of every N-th block (models/checkpointing.py)."""
    x = torch.cat((encoder.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    x = encoder.pos_drop(x)
    rel_pos_bias = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
    depth = len(encoder.blocks)
    for i, blk in enumerate(encoder.blocks[:num_blocks or depth]):
        x = run_block(blk, i, checkpoint_every, x, shared_rel_pos_bias=rel_pos_bias)
    return encoder.norm(x) if (num_blocks or depth) == depth else x


def vit_forward_masked(encoder: Beit, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                       substitute: Callable, checkpoint_every: int = 0) -> torch.Tensor:
    """(B, 3, H, W) images, (B, H/p, W/p) token mask -> (B, C, H/p, W/p) features."""
    b = images.shape[0]
    h, w = encoder.patch_embed.grid_size
    x = encoder.patch_embed(images)                              # (B, L, C)
    x = substitute(x, mask.reshape(b, -1), mask_token)
    x = vit_forward_tokens(encoder, x, checkpoint_every=checkpoint_every)[:, 1:]
    return x.transpose(1, 2).reshape(b, -1, h, w)
