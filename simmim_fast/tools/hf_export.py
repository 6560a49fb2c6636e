"""``simmim-fast export --format hf``: a pretrained SimMIM model as a Hugging Face ``transformers`` folder.

Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``) and ``preprocessor_config.json``
(a ``ViTImageProcessor``: resize to the model's image size, rescale to 0-1, normalise with the run's
``data.mean`` / ``data.std``), so ``from_pretrained(DIR)`` and ``AutoImageProcessor.from_pretrained(DIR)``
load it.

- Swin -> ``SwinForMaskedImageModeling``: the encoder, the mask token and the SimMIM head (1x1 conv +
  PixelShuffle, ``decoder.0``); its loss is the SimMIM formula (masked L1 / masked pixels / channels) on
  the raw normalised image, so it equals ours unless ``model.norm_targets`` is on (transformers has no
  target normalisation). ``SwinModel.from_pretrained(DIR)`` takes the encoder for fine-tuning.
  Renames: timm's fused ``attn.qkv`` is split into ``q_proj`` / ``k_proj`` / ``v_proj``, ``attn.proj``
  is ``o_proj`` (transformers 5.x names); timm runs a stage's patch merging at the start of stage S,
  transformers at the end of stage S - 1.
  transformers' Swin builds every block's bias table for the one ``config.window_size`` and fails when
  a stage's map is smaller than the window (timm and the official code shrink the window there):
  such a model is refused, naming the stage; ``--img-size`` / ``--window-size`` export it for another
  geometry with every table resized bicubically, as the timm export does (outputs then differ from the
  pretrained model's, as they do for any change of window).
- SwinV2 -> ``Swinv2ForMaskedImageModeling``: the same three parts and the same loss. Renames (transformers
  5.x keeps the 4.x names for Swinv2): ``attn.qkv`` with ``q_bias`` / ``v_bias`` -> ``attention.self.query``
  (bias), ``key`` (no bias: timm's k bias is a zero buffer), ``value`` (bias); ``attn.proj`` ->
  ``attention.output.dense``; ``cpb_mlp`` -> ``continuous_position_bias_mlp``; ``logit_scale`` as is;
  ``norm1`` / ``norm2`` (res-post-norm: on the branch output) -> ``layernorm_before`` / ``layernorm_after``
  (which transformers also applies to the branch output); ``mlp.fc1`` / ``fc2`` -> ``intermediate.dense`` /
  ``output.dense``; patch merging placed as for Swin. transformers' Swinv2 shrinks a block's window to a
  smaller stage map (and drops the shift) as timm with ``always_partition=False`` does, so no geometry
  is refused. ``pretrained_window_sizes`` is 0 (coordinates normalised by each block's own window),
  or, for an export at another ``--img-size`` / ``--window-size``, the pretraining stage windows, as
  the timm export sets them.
- ViT -> ``BeitModel`` with the mask token (``use_mask_token``), the shared relative position bias
  (``use_shared_relative_position_bias``), layer scale, no absolute position embedding, LayerNorm eps
  1e-6 and the final LayerNorm on every token (``use_mean_pooling: false``: the pooler returns the cls
  token). transformers has no class for SimMIM's ViT head (``BeitForMaskedImageModeling`` predicts
  BEiT's visual tokens), so the head goes to ``simmim_head.safetensors`` beside the model. timm's
  ``qkv`` weight with ``q_bias`` / ``v_bias`` becomes ``q_proj`` (bias), ``k_proj`` (no bias),
  ``v_proj`` (bias).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file

from ..config import Config, config_to_dict
from ..errors import UserError
from .export import encoder_state_dict, resize_rel_pos_table, swinv2_pretrained_window_sizes

__all__ = ["require_transformers", "swin_stage_maps", "hf_config", "convert_to_hf", "export_hf"]

INSTALL_HINT = "pip install 'simmim-fast[hf]' (or pip install transformers)"


def require_transformers():
    """The ``transformers`` module, or a UserError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"export --format hf needs the transformers package: {INSTALL_HINT}") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise UserError(f"export --format hf writes transformers 5.x names (q_proj/k_proj/v_proj/o_proj); "
                        f"transformers {transformers.__version__} is installed: pip install -U 'transformers>=5'")
    return transformers


def swin_stage_maps(img_size: int, patch_size: int, num_stages: int) -> List[int]:
    """Side of each Swin stage's token map."""
    return [img_size // patch_size // 2 ** s for s in range(num_stages)]


def _check_swin_windows(img_size: int, patch_size: int, num_stages: int, window: int) -> None:
    maps = swin_stage_maps(img_size, patch_size, num_stages)
    small = [s for s, m in enumerate(maps) if m < window]
    if small:
        s = small[0]
        raise UserError(
            f"export --format hf: transformers' Swin uses one window ({window}) for every block and fails where a "
            f"stage's map is smaller (stage {s + 1}: {maps[s]}x{maps[s]} at {img_size} px; timm shrinks the window "
            f"there); export for a geometry where it fits, e.g. --window-size {maps[-1]} or a larger --img-size "
            f"(tables are resized, outputs change), or use --format timm")


def hf_config(cfg: Config, img_size: Optional[int] = None, window_size: Optional[int] = None):
    """The transformers config (``SwinConfig``, ``Swinv2Config`` or ``BeitConfig``) of the pretrained model."""
    transformers = require_transformers()
    m = cfg.model
    size = img_size or m.img_size
    if size % m.patch_size:
        raise UserError(f"--img-size {size} is not a multiple of the patch size {m.patch_size}")
    common = dict(image_size=size, patch_size=m.patch_size, num_channels=m.in_chans, hidden_act="gelu",
                  drop_path_rate=m.drop_path_rate, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if m.is_swin:
        window = window_size or m.window_size
        if size % (m.patch_size * 2 ** (len(m.depths) - 1)):
            raise UserError(f"--img-size {size} is not a multiple of the Swin encoder stride {m.encoder_stride}")
        swin = dict(embed_dim=m.embed_dim, depths=list(m.depths), num_heads=list(m.num_heads), window_size=window,
                    mlp_ratio=float(m.mlp_ratio), qkv_bias=True, use_absolute_embeddings=False, layer_norm_eps=1e-5,
                    encoder_stride=m.encoder_stride, **common)
        if m.encoder == "swinv2":
            pre = swinv2_pretrained_window_sizes(m, size, window)
            if 1 in pre:  # transformers divides the coordinates by (pretrained window - 1); timm by max(.., 1)
                raise UserError(f"export --format hf: a pretraining stage window of 1 (stage windows {pre}) "
                                f"makes transformers' Swinv2 divide by zero at another geometry; export at "
                                f"the pretraining --img-size / --window-size, or use --format timm")
            return transformers.Swinv2Config(pretrained_window_sizes=pre,
                                             architectures=["Swinv2ForMaskedImageModeling"], **swin)
        _check_swin_windows(size, m.patch_size, len(m.depths), window)
        return transformers.SwinConfig(architectures=["SwinForMaskedImageModeling"], **swin)
    if m.encoder == "vit":
        if window_size is not None:
            raise UserError("--window-size is a Swin option; a ViT's relative position bias spans the whole patch grid")
        return transformers.BeitConfig(
            hidden_size=m.embed_dim, num_hidden_layers=m.depths[0], num_attention_heads=m.num_heads[0],
            intermediate_size=int(m.embed_dim * m.mlp_ratio), layer_norm_eps=1e-6, use_mask_token=True,
            use_absolute_position_embeddings=False, use_relative_position_bias=False,
            use_shared_relative_position_bias=True, layer_scale_init_value=float(m.layer_scale_init),
            use_mean_pooling=False, architectures=["BeitModel"], **common)
    raise UserError(f"export --format hf: no transformers mapping for model.encoder {m.encoder!r} (swin, swinv2, vit)")


_QKV_5X = ("q_proj", "k_proj", "v_proj")

# transformers names per Swin family: model attribute, q/k/v, attention output, MLP fc1 / fc2 (Swinv2 keeps
# its 4.x names in 5.x: no conversion_mapping entry renames them)
_SWIN_NAMES = {
    "swin": dict(root="swin", qkv=tuple(f"attention.{n}" for n in _QKV_5X), proj="attention.o_proj",
                 fc1="mlp.fc1", fc2="mlp.fc2"),
    "swinv2": dict(root="swinv2", qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
                   proj="attention.output.dense", fc1="intermediate.dense", fc2="output.dense"),
}


def _split_qkv(prefix_out: str, w: torch.Tensor, b: Optional[torch.Tensor], out: Dict[str, torch.Tensor],
               k_bias: bool = True, names=_QKV_5X) -> None:
    c = w.shape[0] // 3
    for i, name in enumerate(names):
        out[f"{prefix_out}.{name}.weight"] = w[i * c:(i + 1) * c]
        if b is not None and (k_bias or i != 1):
            out[f"{prefix_out}.{name}.bias"] = b[i * c:(i + 1) * c]


def _qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """timm's separate q / v biases as one fused qkv bias (k's part 0, dropped by ``k_bias=False``)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def _swin_to_hf(state: Dict[str, torch.Tensor], cfg: Config, window: int) -> Dict[str, torch.Tensor]:
    enc = encoder_state_dict(state)
    v2 = cfg.model.encoder == "swinv2"
    names = _SWIN_NAMES[cfg.model.encoder]
    root = names["root"]
    out: Dict[str, torch.Tensor] = {f"{root}.embeddings.mask_token": state["mask_token"].reshape(1, 1, -1)}
    rows = (2 * window - 1) ** 2
    used = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return enc[key]

    for p in ("weight", "bias"):
        out[f"{root}.embeddings.patch_embeddings.projection.{p}"] = take(f"patch_embed.proj.{p}")
        out[f"{root}.embeddings.norm.{p}"] = take(f"patch_embed.norm.{p}")
        out[f"{root}.layernorm.{p}"] = take(f"norm.{p}")
        out[f"decoder.0.{p}"] = state[f"head.0.{p}"]
    for s, depth in enumerate(cfg.model.depths):
        if s > 0:  # timm: merging at the start of stage s; transformers: at the end of stage s - 1
            for k in ("reduction.weight", "norm.weight", "norm.bias"):
                out[f"{root}.encoder.layers.{s - 1}.downsample.{k}"] = take(f"layers.{s}.downsample.{k}")
        for b in range(depth):
            src, dst = f"layers.{s}.blocks.{b}", f"{root}.encoder.layers.{s}.blocks.{b}"
            if v2:  # scaled cosine attention; the continuous position bias MLP has no table to resize
                qkv_bias = _qv_bias(take(f"{src}.attn.q_bias"), take(f"{src}.attn.v_bias"))
                _split_qkv(dst, take(f"{src}.attn.qkv.weight"), qkv_bias, out, k_bias=False, names=names["qkv"])
                out[f"{dst}.attention.self.logit_scale"] = take(f"{src}.attn.logit_scale")
                cpb = f"{dst}.attention.self.continuous_position_bias_mlp"
                for k in ("0.weight", "0.bias", "2.weight"):
                    out[f"{cpb}.{k}"] = take(f"{src}.attn.cpb_mlp.{k}")
            else:
                _split_qkv(dst, take(f"{src}.attn.qkv.weight"), take(f"{src}.attn.qkv.bias"), out, names=names["qkv"])
                table = take(f"{src}.attn.relative_position_bias_table")
                if table.shape[0] != rows:
                    table = resize_rel_pos_table(table, rows)
                out[f"{dst}.attention.relative_position_bias.relative_position_bias_table"] = table
            for p in ("weight", "bias"):
                out[f"{dst}.{names['proj']}.{p}"] = take(f"{src}.attn.proj.{p}")
                out[f"{dst}.layernorm_before.{p}"] = take(f"{src}.norm1.{p}")
                out[f"{dst}.layernorm_after.{p}"] = take(f"{src}.norm2.{p}")
                out[f"{dst}.{names['fc1']}.{p}"] = take(f"{src}.mlp.fc1.{p}")
                out[f"{dst}.{names['fc2']}.{p}"] = take(f"{src}.mlp.fc2.{p}")
    _check_all_used(enc, used)
    return out


def _vit_to_hf(state: Dict[str, torch.Tensor], cfg: Config, img_size: int) -> Dict[str, torch.Tensor]:
    enc = encoder_state_dict(state)
    used = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return enc[key]

    grid = img_size // cfg.model.patch_size
    table = take("rel_pos_bias.relative_position_bias_table")
    rows = (2 * grid - 1) ** 2 + 3
    if table.shape[0] != rows:
        table = resize_rel_pos_table(table, rows, num_extra=3)  # cls-to-token, token-to-cls, cls-to-cls kept
    out: Dict[str, torch.Tensor] = {
        "embeddings.mask_token": state["mask_token"].reshape(1, 1, -1),
        "embeddings.cls_token": take("cls_token"),
        "embeddings.patch_embeddings.projection.weight": take("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": take("patch_embed.proj.bias"),
        "shared_position_bias.relative_position_bias_table": table,
        "layernorm.weight": take("norm.weight"), "layernorm.bias": take("norm.bias"),
    }
    for i in range(cfg.model.depths[0]):
        src, dst = f"blocks.{i}", f"layers.{i}"
        qkv_bias = _qv_bias(take(f"{src}.attn.q_bias"), take(f"{src}.attn.v_bias"))
        _split_qkv(f"{dst}.attention", take(f"{src}.attn.qkv.weight"), qkv_bias, out, k_bias=False)
        for p in ("weight", "bias"):
            out[f"{dst}.attention.o_proj.{p}"] = take(f"{src}.attn.proj.{p}")
            out[f"{dst}.layernorm_before.{p}"] = take(f"{src}.norm1.{p}")
            out[f"{dst}.layernorm_after.{p}"] = take(f"{src}.norm2.{p}")
            out[f"{dst}.mlp.fc1.{p}"] = take(f"{src}.mlp.fc1.{p}")
            out[f"{dst}.mlp.fc2.{p}"] = take(f"{src}.mlp.fc2.{p}")
        if f"{src}.gamma_1" in enc:
            out[f"{dst}.lambda_1"] = take(f"{src}.gamma_1")
            out[f"{dst}.lambda_2"] = take(f"{src}.gamma_2")
    _check_all_used(enc, used)
    return out


def _check_all_used(enc: Dict[str, torch.Tensor], used: set) -> None:
    unused = sorted(set(enc) - used)
    if unused:
        raise UserError(f"export --format hf: encoder tensors with no place in the transformers model: {unused[:6]}")


def convert_to_hf(state: Dict[str, torch.Tensor], cfg: Config, hf_cfg) -> Dict[str, torch.Tensor]:
    """SimMIM state dict -> the state dict of ``Swin(v2)ForMaskedImageModeling`` / ``BeitModel`` for ``hf_cfg``."""
    if cfg.model.is_swin:
        out = _swin_to_hf(state, cfg, hf_cfg.window_size)
    else:
        out = _vit_to_hf(state, cfg, hf_cfg.image_size)
    return {k: v.detach().float().clone().contiguous() for k, v in out.items()}


def _model_class(cfg: Config):
    transformers = require_transformers()
    return {"swin": transformers.SwinForMaskedImageModeling, "swinv2": transformers.Swinv2ForMaskedImageModeling,
            "vit": transformers.BeitModel}[cfg.model.encoder]


def export_hf(cfg: Config, state: Dict[str, torch.Tensor], out_dir: str | Path, img_size: Optional[int] = None,
              window_size: Optional[int] = None, source: str = "") -> Dict[str, Any]:
    """Write the transformers folder; returns {'dir', 'class', 'files', 'exact'}."""
    transformers = require_transformers()
    hf_cfg = hf_config(cfg, img_size, window_size)
    weights = convert_to_hf(state, cfg, hf_cfg)
    cls = _model_class(cfg)
    model = cls(hf_cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise UserError(f"export --format hf: {cls.__name__} of transformers {transformers.__version__} has "
                        f"other keys: missing {missing[:6]}, unexpected {unexpected[:6]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    size = hf_cfg.image_size
    transformers.ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=2,  # bilinear, as the training crops
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(cfg.data.mean), image_std=list(cfg.data.std)).save_pretrained(str(out))
    files = sorted(p.name for p in out.iterdir())
    if cfg.model.encoder == "vit":
        save_file({"weight": state["head.0.weight"].float().contiguous(),
                   "bias": state["head.0.bias"].float().contiguous()}, str(out / "simmim_head.safetensors"),
                  metadata={"what": "SimMIM head: Conv2d(hidden, patch^2 * channels, 1) + PixelShuffle(patch) on "
                                    "the patch tokens of BeitModel's last_hidden_state[:, 1:]"})
        files.append("simmim_head.safetensors")
    exact = (hf_cfg.image_size == cfg.model.img_size
             and (not cfg.model.is_swin or hf_cfg.window_size == cfg.model.window_size))
    (out / "simmim_export.json").write_text(json.dumps({
        "transformers_class": cls.__name__, "transformers_version": transformers.__version__,
        "source": str(source), "same_geometry_as_pretraining": exact,
        "loss_equals_simmim": cfg.model.is_swin and exact and not cfg.model.norm_targets,
        "pretrain_config": config_to_dict(cfg)}, indent=2) + "\n")
    files.append("simmim_export.json")
    return {"dir": out, "class": cls.__name__, "files": sorted(files), "exact": exact}
