"""Swin encoder for SimMIM: a plain timm ``SwinTransformer`` plus the masked forward.

The encoder stays a stock timm module (so its state dict loads into timm unchanged); the mask
token lives on the SimMIM model and is substituted right after patch embedding, i.e. after the
patch-embed LayerNorm, which timm's PatchEmbed applies itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from simmim_fast.kernels import window_attention

from ..config import ModelConfig
from .checkpointing import forward_swin_stages

__all__ = ["create_swin", "swin_forward_masked", "FusedSwinTransformerBlock", "use_fused_attention"]


class FusedSwinTransformerBlock(SwinTransformerBlock):
    """timm's block with its attention path (roll, partition, WindowAttention, reverse, roll back)
    run by the fused ``window_attention`` op between the block's own qkv and proj Linears.

    Only the method changes (blocks are converted in place, ``use_fused_attention``), so the
    parameters, buffers and state dict are timm's. timm's path is kept where the op does not apply:
    a map that is not a multiple of the window (timm pads it; the padded tokens take part in the
    softmax of timm's path, which the op has no notion of), a non-square window or unequal shifts
    (timm's last-stage rule shrinks the window to a map no larger than it along one axis only), and
    attention dropout while training. timm's last-stage rule for a map no larger than the window
    (one window of the whole map, no shift) is the op's one-window case.
    """

    ops_backend: str = "auto"

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        attn = self.attn
        if (wh != ww or sh != sw or h % wh or w % ww or not 0 <= sh < wh
                or (self.training and attn.attn_drop.p > 0)):
            return super()._attn(x)
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)           # (B, H, W, 3C), before the shift
        out = window_attention(qkv, attn._get_rel_pos_bias(), attn.num_heads, wh, sh, scale=attn.scale,
                               backend=self.ops_backend)
        return attn.proj_drop(attn.proj(out))


def use_fused_attention(encoder: SwinTransformer, ops_backend: str = "auto") -> SwinTransformer:
    """Switch every Swin block of ``encoder`` to the fused attention, in place; returns it."""
    for module in encoder.modules():
        if type(module) is SwinTransformerBlock:
            module.__class__ = FusedSwinTransformerBlock
            module.ops_backend = ops_backend
    return encoder


def create_swin(cfg: ModelConfig) -> SwinTransformer:
    # timm shrinks a window to the stage's map, with no shift, when the map is not larger than the
    # window (always_partition=False), which is the SimMIM rule for the last stage at 192 px.
    encoder = SwinTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate, always_partition=False)
    if cfg.attention == "fused":
        use_fused_attention(encoder, cfg.ops_backend)
    return encoder


def swin_forward_masked(encoder: SwinTransformer, images: torch.Tensor, mask: torch.Tensor,
                        mask_token: torch.Tensor, substitute: Callable, checkpoint_every: int = 0) -> torch.Tensor:
    """(B, 3, H, W) images, (B, H/p, W/p) token mask -> (B, C_out, H/32, W/32) features."""
    x = encoder.patch_embed(images)            # (B, H/p, W/p, C), LayerNorm applied
    x = substitute(x, mask, mask_token)
    x = forward_swin_stages(encoder.layers, x, checkpoint_every)  # = encoder.layers(x), block by block
    x = encoder.norm(x)                        # (B, h, w, C_out)
    return x.permute(0, 3, 1, 2)
