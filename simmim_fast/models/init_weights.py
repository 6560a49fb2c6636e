"""``model.init_weights``: start the encoder from a timm state file (continued pretraining).

Reads ``.safetensors`` / ``.pth`` files with the reader `simmim-fast export` and the tools use
(``simmim_fast.weights``): a timm ``state_dict()`` (e.g. saved after ``timm.create_model(name,
pretrained=True)``), one of our exports (timm keys), or a SimMIM state / checkpoint model file
(keys under ``encoder.``). The classifier ``head.*`` of a timm file is dropped (SimMIM has its own
head). With ``model.in_chans`` other than the file's channel count, the patch embedding is adapted
by timm's ``adapt_input_conv`` rule (as timm's pretrained loading does): 1 channel = the sum of the
RGB kernels; C > 3 = the RGB kernels repeated cyclically over C, then scaled by 3 / C. Tensors
whose shape still differs (another window size or image size) are reported as mismatched and not
loaded, except relative position bias tables: another window size is handled as ``simmim-fast
export`` handles it, each head's (2W-1) x (2W-1) grid resized bicubically (the official Swin
fine-tuning code's interpolation), BEiT's three extra cls rows kept. The geometry buffers
(``relative_position_index``, ``attn_mask``) are never taken from the file: they follow the
model's own window and image size. Missing and unexpected keys are logged; ``model.init_strict:
true`` refuses any of them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["load_init_weights", "resize_rel_pos_table"]

GEOMETRY_BUFFERS = ("relative_position_index", "attn_mask")  # derived from window / image size by timm

log = logging.getLogger(__name__)


def resize_rel_pos_table(table: torch.Tensor, dst_rows: int, num_extra: int = 0) -> torch.Tensor:
    """Resize a ((2W-1)^2 + extra, heads) relative position bias table to ``dst_rows`` rows.

    The (2W-1) x (2W-1) grid of each head is resized bicubically (``F.interpolate``,
    align_corners False, as the official Swin fine-tuning code); the ``num_extra`` trailing rows
    (BEiT's cls-to-token, token-to-cls and cls-to-cls biases) are kept as they are.
    """
    rows, heads = table.shape
    src, dst = rows - num_extra, dst_rows - num_extra
    s, d = round(src ** 0.5), round(dst ** 0.5)
    if s * s != src or d * d != dst:
        raise UserError(f"relative position table of {rows} rows ({num_extra} extra) -> {dst_rows} rows: "
                         f"the grids must be square")
    grid, extra = table[:src], table[src:]
    if s != d:
        grid = F.interpolate(grid.float().t().reshape(1, heads, s, s), size=(d, d), mode="bicubic",
                             align_corners=False).reshape(heads, d * d).t().to(table.dtype)
    return torch.cat([grid, extra]).contiguous()



def _encoder_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if any(k.startswith("encoder.") for k in state):  # SimMIM state: the encoder part
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_init_weights(encoder: nn.Module, path: str, strict: bool = False) -> Dict[str, List[str]]:
    """Load ``path`` into ``encoder``; returns {'missing', 'unexpected', 'mismatched', 'adapted', 'resized'}."""
    from timm.models import adapt_input_conv

    from ..weights import read_state_file  # weights.py builds SimMIM models: imported here, when used

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model.init_weights = {path}: file not found")
    try:
        state, _ = read_state_file(p)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"model.init_weights = {path}: cannot read it: {e}") from None
    state = {k: v for k, v in _encoder_state(state).items() if not k.endswith(GEOMETRY_BUFFERS)}
    own = encoder.state_dict()
    adapted, mismatched, resized = [], [], []
    extra_rows = 3 if getattr(encoder, "cls_token", None) is not None else 0  # BEiT: cls-token biases
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
        state[key] = adapt_input_conv(own[key].shape[1], state[key].float()).to(own[key].dtype)
        adapted.append(key)
    for k in list(state):
        v = state[k]
        if (k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape and v.dim() == 2
                and v.shape[1] == own[k].shape[1]):
            try:
                state[k] = resize_rel_pos_table(v.float(), own[k].shape[0], extra_rows).to(own[k].dtype)
                resized.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
            except UserError:
                pass  # not square grids: reported as mismatched below
        if k in own and state[k].shape != own[k].shape:
            mismatched.append(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
            del state[k]
    missing = sorted(k for k in own if k not in state and not k.endswith(GEOMETRY_BUFFERS))
    unexpected = sorted(k for k in state if k not in own)
    report = dict(missing=missing, unexpected=unexpected, mismatched=mismatched, adapted=adapted, resized=resized)
    if strict and (missing or unexpected or mismatched):
        raise UserError(f"model.init_weights = {path} with model.init_strict: {len(missing)} missing "
                        f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}), "
                        f"{len(mismatched)} mismatched ({', '.join(mismatched[:2])}) keys")
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    log.info("init_weights: %d tensors from %s; patch embedding adapted by adapt_input_conv: %s; "
             "relative position tables resized: %d; missing %s; unexpected %s; mismatched %s",
             len(state) - len(unexpected), path, adapted or "no", len(resized), missing or "none",
             unexpected or "none", mismatched or "none")
    return report
