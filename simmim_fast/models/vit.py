"""ViT encoder for SimMIM: timm's BEiT-style ViT (``Beit``) in the SimMIM variant.

No absolute position embedding, one relative position bias shared by all blocks, layer scale,
LayerNorm eps 1e-6, qkv bias. The mask token replaces patch embeddings before the cls token is
prepended; the cls token is dropped at the output.

Initialisation follows the official ``VisionTransformerForSimMIM`` (microsoft/SimMIM
models/simmim.py), not timm's Beit default: that class overrides ``_trunc_normal_`` with the cut
``a=-std, b=std``, so the cls token, the mask token, every Linear weight and the patch-embedding
conv are drawn from a normal of std 0.02 truncated at +-1 std (+-0.02; effective std
0.02 * 0.53956 = 0.01079), Linear and conv biases are zero, LayerNorms are (1, 0), and then each
block's ``attn.proj`` and ``mlp.fc2`` weights are divided by sqrt(2 * (block index + 1))
(BEiT's ``fix_init_weight``). timm's Beit cuts at +-2 absolute (i.e. an untruncated std 0.02, 1.85x
wider) and leaves the patch-embedding conv at PyTorch's default.
"""
from __future__ import annotations

from typing import Callable, Optional

import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.beit import Beit

from ..config import ModelConfig
from .checkpointing import run_block

__all__ = ["create_vit", "vit_forward_masked", "official_trunc_normal_", "init_vit_official"]

INIT_STD = 0.02


def create_vit(cfg: ModelConfig) -> Beit:
    return Beit(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        global_pool="token", use_fc_norm=False,  # keep the final norm: the head reads every token
        embed_dim=cfg.embed_dim, depth=cfg.depths[0], num_heads=cfg.num_heads[0], mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
        init_values=cfg.layer_scale_init or None,
        use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


def official_trunc_normal_(tensor: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    """Normal(0, std) truncated at +-std: ``VisionTransformerForSimMIM._trunc_normal_``."""
    return trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def init_vit_official(encoder: Beit, layer_scale_init: float = 0.0) -> None:
    """Re-initialise a ``create_vit`` encoder as the official SimMIM ViT (see the module docstring).

    Position bias tables and the q/v biases start at zero and layer scale at ``layer_scale_init``, as
    in the official code (timm does the same; set here so the whole init is stated in one place).
    """
    if encoder.pos_embed is not None:
        official_trunc_normal_(encoder.pos_embed)
    official_trunc_normal_(encoder.cls_token)
    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            official_trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in encoder.named_parameters():
        if name.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
            nn.init.zeros_(p)
        elif name.endswith(("gamma_1", "gamma_2")):
            nn.init.constant_(p, layer_scale_init)
    for layer_id, blk in enumerate(encoder.blocks):  # BEiT's fix_init_weight
        scale = math.sqrt(2.0 * (layer_id + 1))
        blk.attn.proj.weight.div_(scale)
        blk.mlp.fc2.weight.div_(scale)


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
