"""SwinV2 encoder for SimMIM: a plain timm ``SwinTransformerV2`` plus the masked forward.

SwinV2 (Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution") changes three
things in the Swin block: res-post-norm (LayerNorm on the attention / MLP branch output before the
residual add, its weight and bias initialised to 0), scaled cosine attention (cosine similarity of
q and k times a learned per-head scale ``exp(logit_scale)``, clamped at 100) and a log-spaced
continuous relative position bias (a 2-layer MLP, ``cpb_mlp``, on log-spaced relative coordinates,
``16 * sigmoid`` of its output). The encoder stays a stock timm module, so its state dict loads into
timm unchanged; the mask token lives on the SimMIM model and replaces patch embeddings right after
patch embedding (after the patch-embed LayerNorm), as in the official SwinV2 SimMIM
(``SwinTransformerV2ForSimMIM`` in microsoft/Swin-Transformer ``models/simmim.py``).

timm's SwinTransformerV2 with ``always_partition=False`` and ``pretrained_window_sizes`` 0 computes
what the official ``models/swin_transformer_v2.py`` computes (tests/test_swinv2.py checks it against
an independent reference of the official forward); the differences in code are layout only:
- timm runs a stage's patch merging at the start of the next stage, the official code at the end of
  the stage: the same modules in the same order. Patch merging concatenates the 2 x 2 neighbours in
  the official order (0,0), (1,0), (0,1), (1,1), then reduction, then LayerNorm (post-norm, V2).
- timm keeps tokens as (B, H, W, C), the official code as (B, H*W, C).
- A stage whose map is not larger than the window attends over the whole map with no shift, in
  both (``always_partition=False`` in timm; ``min(input_resolution) <= window_size`` officially).
- timm pads a map that is not a multiple of the window; the official code cannot run such a map.
  ``model.validate`` refuses such configs for ``swinv2``, so the padding path never runs.
- Init: both apply trunc-normal(0.02) to every Linear (the cpb MLP included) with zero biases,
  LayerNorm 1 / 0, then zero the res-post-norms; logit scale log(10); q and v biases 0 (k has none).
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

from ..config import ModelConfig
from .checkpointing import forward_swin_stages

__all__ = ["create_swinv2", "swinv2_forward_masked", "stage_windows"]


def create_swinv2(cfg: ModelConfig) -> SwinTransformerV2:
    # pretrained_window_sizes 0: the continuous position bias normalises relative coordinates by the
    # window itself (pretraining); fine-tuning at another window passes the pretraining windows
    # (simmim-fast export does). always_partition=False: the official window rule (module docstring).
    return SwinTransformerV2(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
        embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate, always_partition=False,
        pretrained_window_sizes=(0,) * len(cfg.depths))


def swinv2_forward_masked(encoder: SwinTransformerV2, images: torch.Tensor, mask: torch.Tensor,
                          mask_token: torch.Tensor, substitute: Callable, checkpoint_every: int = 0) -> torch.Tensor:
    """(B, C_in, H, W) images, (B, H/p, W/p) token mask -> (B, C_out, H/32, W/32) features."""
    x = encoder.patch_embed(images)            # (B, H/p, W/p, C), LayerNorm applied
    x = substitute(x, mask, mask_token)
    x = forward_swin_stages(encoder.layers, x, checkpoint_every)
    x = encoder.norm(x)                        # (B, h, w, C_out)
    return x.permute(0, 3, 1, 2)


def stage_windows(cfg: ModelConfig) -> tuple:
    """The window each stage uses (the map side where the map is not larger than the window)."""
    side = cfg.img_size // cfg.patch_size
    out = []
    for i in range(len(cfg.depths)):
        s = side // 2 ** i
        out.append(s if s <= cfg.window_size else cfg.window_size)
    return tuple(out)
