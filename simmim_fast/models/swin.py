"""Swin encoder for SimMIM: a plain timm ``SwinTransformer`` plus the masked forward.

The encoder stays a stock timm module (so its state dict loads into timm unchanged); the mask
token lives on the SimMIM model and is substituted right after patch embedding, i.e. after the
patch-embed LayerNorm, which timm's PatchEmbed applies itself.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.models.swin_transformer import SwinTransformer

from ..config import ModelConfig
from .checkpointing import forward_swin_stages

__all__ = ["create_swin", "swin_forward_masked"]


def create_swin(cfg: ModelConfig) -> SwinTransformer:
    # timm shrinks a window to the stage's map, with no shift, when the map is not larger than the
    # window (always_partition=False), which is the SimMIM rule for the last stage at 192 px.
    return SwinTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate, always_partition=False)


def swin_forward_masked(encoder: SwinTransformer, images: torch.Tensor, mask: torch.Tensor,
                        mask_token: torch.Tensor, substitute: Callable, checkpoint_every: int = 0) -> torch.Tensor:
    """(B, 3, H, W) images, (B, H/p, W/p) token mask -> (B, C_out, H/32, W/32) features."""
    x = encoder.patch_embed(images)            # (B, H/p, W/p, C), LayerNorm applied
    x = substitute(x, mask, mask_token)
    x = forward_swin_stages(encoder.layers, x, checkpoint_every)  # = encoder.layers(x), block by block
    x = encoder.norm(x)                        # (B, h, w, C_out)
    return x.permute(0, 3, 1, 2)
