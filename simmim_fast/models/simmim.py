"""SimMIM: encoder with mask token, 1x1 conv + PixelShuffle head, masked L1 loss.

    model = SimMIM.from_config(cfg)
    loss = model(images, mask)            # images (B, 3, H, W) normalised, mask (B, H/p, W/p)
    rec = model.reconstruct(images, mask) # (B, 3, H, W), in the loss's target space
"""
from __future__ import annotations

from typing import Set, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from simmim_fast.kernels import masked_l1_loss, mask_token_substitute

from ..config import Config, ModelConfig
from .checkpointing import checkpoint_every
from .swin import create_swin, swin_forward_masked
from .swinv2 import create_swinv2, swinv2_forward_masked
from .vit import create_vit, init_vit_official, official_trunc_normal_, vit_forward_masked

__all__ = ["SimMIM", "normalize_targets", "denormalize_targets", "local_stats", "POSITION_BIAS_KEYWORDS"]

# Parameter-name parts of the position-bias parameters the official encoders list in
# no_weight_decay_keywords(): Swin's and ViT's relative position bias tables, SwinV2's continuous
# position bias MLP and its attention logit scale (microsoft/Swin-Transformer models/swin_transformer*.py).
POSITION_BIAS_KEYWORDS = ("relative_position_bias_table", "cpb_mlp", "logit_scale")


def local_stats(x: torch.Tensor, window: int = 47):
    """Per pixel and channel: mean and unbiased variance over a ``window`` x ``window`` square
    (stride 1, zero padding excluded from the means, n / (n - 1) with n the in-image pixels of
    each window, clamped at 0), in fp32."""
    x = x.float()
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    n = F.avg_pool2d(torch.ones_like(x[:, :1]), window, stride=1, padding=pad, count_include_pad=True) * window ** 2
    var = ((mean_sq - mean ** 2) * (n / (n - 1))).clamp(min=0)
    return mean, var


def normalize_targets(x: torch.Tensor, window: int = 47) -> torch.Tensor:
    """SwinV2 target normalisation: (x - local mean) / sqrt(local var + 1e-6), see ``local_stats``."""
    mean, var = local_stats(x, window)
    return (x.float() - mean) / (var + 1e-6).sqrt()


def denormalize_targets(rec: torch.Tensor, images: torch.Tensor, window: int = 47) -> torch.Tensor:
    """Inverse of ``normalize_targets`` with the local statistics of ``images`` (hidden patches
    included, which the model never sees): for display only."""
    mean, var = local_stats(images, window)
    return rec.float() * (var + 1e-6).sqrt() + mean


class SimMIM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.encoder_stride = cfg.encoder_stride
        if cfg.encoder == "swin":
            self.encoder = create_swin(cfg)
            self._forward_masked = swin_forward_masked
        elif cfg.encoder == "swinv2":
            self.encoder = create_swinv2(cfg)
            self._forward_masked = swinv2_forward_masked
        else:
            self.encoder = create_vit(cfg)
            init_vit_official(self.encoder, cfg.layer_scale_init)
            self._forward_masked = vit_forward_masked
        self.checkpoint_every = 0  # activation checkpointing: see set_activation_checkpointing
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        if cfg.mask_token_init == "trunc_normal":
            if cfg.encoder == "vit":  # VisionTransformerForSimMIM: cut at +-1 std
                official_trunc_normal_(self.mask_token.data)
            else:  # SwinTransformerForSimMIM: timm's default cut (+-2 absolute)
                trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.head = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.encoder_stride ** 2 * cfg.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride))
        if cfg.init_weights:
            from .init_weights import load_init_weights
            load_init_weights(self.encoder, cfg.init_weights, cfg.init_strict)

    @classmethod
    def from_config(cls, cfg: Union[Config, ModelConfig]) -> "SimMIM":
        return cls(cfg.model if isinstance(cfg, Config) else cfg)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks of the encoder (all stages)."""
        return sum(self.cfg.depths)

    def set_activation_checkpointing(self, every: Union[bool, int]) -> "SimMIM":
        """Activation checkpointing of the encoder blocks (``engine.activation_checkpointing``):
        False / 0 = off, True / 1 = every block, N = every N-th block (blocks 0, N, 2N, ... over all
        stages). Changes no parameter or buffer; takes effect at the next forward."""
        self.checkpoint_every = checkpoint_every(every)
        return self

    def checkpointed_blocks(self) -> int:
        """How many encoder blocks the current setting checkpoints."""
        e = self.checkpoint_every
        return 0 if not e else len(range(0, self.num_blocks, e))

    def _substitute(self, x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return mask_token_substitute(x, mask, token, backend=self.cfg.ops_backend)

    def _check_inputs(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        c, s, p = self.in_chans, self.cfg.img_size, self.patch_size
        if images.dim() != 4 or images.shape[1:] != (c, s, s):
            raise ValueError(f"SimMIM: images must be (B, {c}, {s}, {s}), got {tuple(images.shape)}")
        if mask.shape != (images.shape[0], s // p, s // p):
            raise ValueError(f"SimMIM: mask must be the token mask (B, {s // p}, {s // p}) for images "
                             f"{tuple(images.shape)}, got {tuple(mask.shape)}")

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Head output (B, 3, H, W): the predicted target (the normalised image, or with
        model.norm_targets the locally normalised image)."""
        self._check_inputs(images, mask)
        z = self._forward_masked(self.encoder, images, mask, self.mask_token, self._substitute,
                                 checkpoint_every=self.checkpoint_every)
        return self.head(z)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rec = self.reconstruct(images, mask)
        target = normalize_targets(images, self.cfg.norm_targets_window) if self.cfg.norm_targets else images
        return masked_l1_loss(rec, target, mask, self.patch_size, backend=self.cfg.ops_backend)

    def no_weight_decay(self) -> Set[str]:
        """Parameter names excluded from weight decay besides 1-D tensors and biases."""
        names = {"mask_token"}
        names |= {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", lambda: set())()}
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names

    def official_decayed_names(self) -> Set[str]:
        """Parameters the official SimMIM pretraining decayed that ``no_weight_decay`` exempts.

        Its SimMIM wrapper prefixes the encoder's no_weight_decay_keywords() with ``encoder.`` and tests
        them as substrings of the full names (``encoder.layers.0.blocks.0.attn.relative_...``), so they
        never match (microsoft/Swin-Transformer issue #369): every position-bias parameter that is not a
        1-D tensor or a bias was decayed. Its ViT lists no keywords (same result) and no mask token in
        no_weight_decay(), and its (1, 1, C) mask token was decayed; Swin and SwinV2 list the mask token.
        """
        names = {n for n, p in self.named_parameters()
                 if any(k in n for k in POSITION_BIAS_KEYWORDS) and p.ndim > 1 and not n.endswith(".bias")}
        if self.cfg.encoder == "vit":
            names.add("mask_token")
        return names
