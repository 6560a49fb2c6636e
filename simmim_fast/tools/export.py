"""``simmim-fast export``: a pretrained SimMIM encoder as a plain timm state dict (``--format hf``:
a Hugging Face transformers folder, see ``hf_export``).

The SimMIM encoder is already a stock timm module, so export is mostly renaming: the
``encoder.`` prefix goes, the mask token and the SimMIM head (1x1 conv + PixelShuffle) are
dropped. What changes with the fine-tuning model:

- Swin, window changed (e.g. 6 at 192 px -> 7 at 224 px): every block's
  ``relative_position_bias_table`` ((2W-1)^2 x heads) is resized bicubically on its
  (2W-1) x (2W-1) grid, as the official Swin Transformer fine-tuning code does. Each target table
  gets the shape of the target block (stages whose map is smaller than the window keep the map
  size). ``relative_position_index`` and ``attn_mask`` are buffers timm regenerates.
- SwinV2: no tables to resize (the continuous position bias is an MLP on relative coordinates, and
  timm regenerates the coordinates); a fine-tuning model whose stage windows differ from the
  pretraining ones gets ``pretrained_window_sizes`` = the pretraining stage windows (e.g. 12, 12,
  12, 6 for 192 px / window 12), which the coordinates are normalised by, as official SwinV2
  fine-tuning and timm's ``swinv2_*_window12to16_192to256`` do.
- ViT (timm ``Beit``): SimMIM trains one shared ``rel_pos_bias.relative_position_bias_table``;
  BEiT-style fine-tuning (timm ``beit_*`` models) uses one table per block, so the shared table
  is copied into each ``blocks.<i>.attn.relative_position_bias_table`` (the 3 cls-related entries
  at the end kept, the (2W-1)^2 grid resized if the patch grid changes). The SimMIM encoder's
  final ``norm`` (kept because the head reads every token) becomes ``fc_norm`` when the target
  pools by averaging (timm's beit default: ``norm`` is Identity there, ``fc_norm`` applies after
  the average), or stays ``norm`` for a token-pooling target.

The result loads with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), num_classes=N, **kwargs)`` or ``load_state_dict`` with no
missing keys except the classifier head; the printed command and ``<output>.json`` give the exact
name and kwargs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import Config, config_to_dict, load_config
from ..errors import UserError
from ..models.init_weights import resize_rel_pos_table
from ..models.swinv2 import stage_windows
from ..weights import build_timm_model, load_model_state, load_source

__all__ = ["normalisation", "read_normalisation", "encoder_state_dict", "timm_target", "build_timm_model", "convert_to_timm", "resize_rel_pos_table",
           "swinv2_pretrained_window_sizes",
           "save_timm_weights", "KNOWN_TIMM_MODELS", "add_arguments", "main"]

# timm names whose architecture a SimMIM config can match, with the arguments that define them.
KNOWN_TIMM_MODELS: Dict[str, Dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": dict(encoder="swin", patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                                         num_heads=[3, 6, 12, 24], img_size=224, window_size=7),
    "swin_small_patch4_window7_224": dict(encoder="swin", patch_size=4, embed_dim=96, depths=[2, 2, 18, 2],
                                          num_heads=[3, 6, 12, 24], img_size=224, window_size=7),
    "swin_base_patch4_window7_224": dict(encoder="swin", patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                                         num_heads=[4, 8, 16, 32], img_size=224, window_size=7),
    "swin_large_patch4_window7_224": dict(encoder="swin", patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                                          num_heads=[6, 12, 24, 48], img_size=224, window_size=7),
    "swinv2_tiny_window8_256": dict(encoder="swinv2", patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                                    num_heads=[3, 6, 12, 24], img_size=256, window_size=8),
    "swinv2_small_window8_256": dict(encoder="swinv2", patch_size=4, embed_dim=96, depths=[2, 2, 18, 2],
                                     num_heads=[3, 6, 12, 24], img_size=256, window_size=8),
    "swinv2_base_window12_192": dict(encoder="swinv2", patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                                     num_heads=[4, 8, 16, 32], img_size=192, window_size=12),
    "swinv2_base_window12to16_192to256": dict(encoder="swinv2", patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                                              num_heads=[4, 8, 16, 32], img_size=256, window_size=16,
                                              pretrained_window_sizes=[12, 12, 12, 6]),
    "swinv2_large_window12_192": dict(encoder="swinv2", patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                                      num_heads=[6, 12, 24, 48], img_size=192, window_size=12),
    "swinv2_large_window12to16_192to256": dict(encoder="swinv2", patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                                               num_heads=[6, 12, 24, 48], img_size=256, window_size=16,
                                               pretrained_window_sizes=[12, 12, 12, 6]),
    "beit_base_patch16_224": dict(encoder="vit", patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                  img_size=224),
    "beit_large_patch16_224": dict(encoder="vit", patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                   img_size=224),
}
# What every timm swin_* / beit_* entry point sets besides the table above.
_FAMILY_DEFAULTS = {"swin": dict(in_chans=3, mlp_ratio=4.0),
                    "swinv2": dict(in_chans=3, mlp_ratio=4.0, pretrained_window_sizes=[0, 0, 0, 0]),
                    "vit": dict(in_chans=3, mlp_ratio=4.0, use_abs_pos_emb=False, use_rel_pos_bias=True,
                                use_shared_rel_pos_bias=False)}
_GENERIC = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256",
            "vit": "beit_base_patch16_224"}
_FAMILY_PATTERN = {"swin": "swin_*", "swinv2": "swinv2_*", "vit": "beit_*"}
_DROPPED = ("mask_token", "head.")                   # SimMIM-only parameters
_BUFFERS = ("relative_position_index", "attn_mask")  # regenerated by timm


def encoder_state_dict(simmim_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder's tensors of a SimMIM state dict, ``encoder.`` prefix removed, buffers dropped."""
    enc = {k[len("encoder."):]: v for k, v in simmim_state.items() if k.startswith("encoder.")}
    other = [k for k in simmim_state if not k.startswith("encoder.") and not k.startswith(_DROPPED)]
    if not enc or other:
        raise UserError(f"not a SimMIM state dict: {'no encoder.* keys' if not enc else f'unexpected keys {other[:4]}'}")
    return {k: v for k, v in enc.items() if not k.endswith(_BUFFERS)}


def timm_target(cfg: Config, model_name: Optional[str] = None, img_size: Optional[int] = None,
                window_size: Optional[int] = None, vit_rel_pos: str = "per-block",
                vit_pool: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, kwargs) of the fine-tuning model for a pretraining config.

    Without ``model_name`` the known timm name with the config's architecture is used (a generic
    family name with explicit kwargs if none matches). Image size and window default to the
    named model's when ``model_name`` is a known name, else to the pretraining config's.
    """
    m = cfg.model
    arch = _architecture(m)
    if model_name is None:
        model_name = next((n for n, a in KNOWN_TIMM_MODELS.items()
                           if a["encoder"] == m.encoder and all(a[k] == v for k, v in arch.items())),
                          _GENERIC[m.encoder])
        known = KNOWN_TIMM_MODELS[model_name]
        defaults = dict(img_size=m.img_size, window_size=m.window_size)
    else:
        known = KNOWN_TIMM_MODELS.get(model_name)
        if known is not None and known["encoder"] == m.encoder:
            differ = {k: (v, known[k]) for k, v in arch.items() if known[k] != v}
            if differ:
                raise UserError(f"timm model {model_name!r} is not the pretrained architecture: "
                                 + ", ".join(f"{k} {a} (checkpoint) vs {b}" for k, (a, b) in differ.items()))
        defaults = (dict(img_size=known["img_size"], window_size=known.get("window_size", m.window_size))
                    if known else dict(img_size=m.img_size, window_size=m.window_size))
    family = _family(model_name)
    if family != m.encoder:
        raise UserError(f"timm model {model_name!r} does not fit model.encoder {m.encoder!r}: use a "
                         f"{_FAMILY_PATTERN[m.encoder]} model")
    if vit_rel_pos not in ("per-block", "shared"):
        raise UserError(f"vit_rel_pos must be 'per-block' or 'shared', got {vit_rel_pos!r}")
    target = dict(arch, img_size=img_size or defaults["img_size"], in_chans=m.in_chans, mlp_ratio=m.mlp_ratio)
    if m.is_swin:
        target["window_size"] = window_size or defaults["window_size"]
    if m.encoder == "swinv2":
        # The continuous position bias normalises relative coordinates by the pretraining window; a
        # model fine-tuned at another window or size passes the pretraining windows of each stage, as
        # the official SwinV2 fine-tuning configs (PRETRAINED_WINDOW_SIZES) and timm's *to* models do.
        target["pretrained_window_sizes"] = swinv2_pretrained_window_sizes(m, target["img_size"], target["window_size"])
    elif m.encoder == "vit":
        target.update(use_abs_pos_emb=False, use_rel_pos_bias=vit_rel_pos == "per-block",
                      use_shared_rel_pos_bias=vit_rel_pos == "shared")
        if not m.layer_scale_init:
            target["init_values"] = None  # no layer scale: no gamma tensors
        if vit_pool is not None:
            target["global_pool"] = vit_pool
    # Pass only what the name does not already imply (all of it for a name not in the table).
    implied = dict(_FAMILY_DEFAULTS[m.encoder], **known) if known else {}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in target.items()
              if k not in implied or implied[k] != v}
    return model_name, kwargs


def swinv2_pretrained_window_sizes(m, img_size: int, window_size: int) -> list:
    """SwinV2 ``pretrained_window_sizes`` of a model at ``img_size`` / ``window_size``: 0s where every stage
    window equals the pretraining one, else the pretraining stage windows."""
    tuned = dataclasses.replace(m, img_size=img_size, window_size=window_size)
    pre = list(stage_windows(m))
    return pre if list(stage_windows(tuned)) != pre else [0] * len(m.depths)


def _family(model_name: str) -> Optional[str]:
    for prefix, family in (("swinv2", "swinv2"), ("swin", "swin"), ("beit", "vit")):
        if model_name.startswith(prefix):
            return family
    return None


def _architecture(m) -> Dict[str, Any]:
    if m.is_swin:
        return dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depths=list(m.depths), num_heads=list(m.num_heads))
    return dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depths[0], num_heads=m.num_heads[0])


def convert_to_timm(encoder_state: Dict[str, torch.Tensor], target: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Map an encoder state dict onto the keys and shapes of the ``target`` timm model.

    Every key of the target except its classifier (``head.*``) must be produced, and every source
    tensor used; anything else is an error naming the keys.
    """
    want = {k: v.shape for k, v in target.state_dict().items()
            if not k.startswith("head.") and not k.endswith(_BUFFERS)}
    out: Dict[str, torch.Tensor] = {}
    used = set()
    shared = "rel_pos_bias.relative_position_bias_table"
    for key, shape in want.items():
        src_key = key
        if key not in encoder_state:
            if key.endswith("attn.relative_position_bias_table") and shared in encoder_state:
                src_key = shared
            elif key.startswith("fc_norm.") and "norm." + key[len("fc_norm."):] in encoder_state:
                src_key = "norm." + key[len("fc_norm."):]
            else:
                continue
        v = encoder_state[src_key]
        if key.endswith("relative_position_bias_table") and v.shape != shape:
            if v.dim() != 2 or v.shape[1] != shape[1]:
                raise UserError(f"{key}: pretrained table {tuple(v.shape)} has {v.shape[1]} heads, target "
                                 f"{tuple(shape)} has {shape[1]}")
            extra = 3 if hasattr(target, "cls_token") else 0
            v = resize_rel_pos_table(v, shape[0], num_extra=extra)
        if v.shape != shape:
            raise UserError(f"{key}: pretrained {tuple(v.shape)} does not fit the target {tuple(shape)}; "
                             f"does the timm model have the pretraining architecture?")
        out[key] = v.clone().contiguous()
        used.add(src_key)
    missing = [k for k in want if k not in out]
    unused = [k for k in encoder_state if k not in used]
    if missing or unused:
        raise UserError(f"encoder and timm model {type(target).__name__} differ: target keys with no pretrained "
                         f"tensor {missing[:6]}{' ...' if len(missing) > 6 else ''}; pretrained tensors with no "
                         f"place {unused[:6]}{' ...' if len(unused) > 6 else ''}")
    return out


def save_timm_weights(state: Dict[str, torch.Tensor], output: str | Path, info: Dict[str, Any]) -> Dict[str, Path]:
    """Write ``<output>.safetensors``, ``<output>.pth`` (plain state dicts) and ``<output>.json`` (info)."""
    from safetensors.torch import save_file
    base = Path(output)
    if base.suffix in (".safetensors", ".pth", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {"safetensors": base.with_name(base.name + ".safetensors"), "pth": base.with_name(base.name + ".pth"),
             "json": base.with_name(base.name + ".json")}
    meta = {"format": "pt", "timm_model": info["model_name"]}
    if "normalisation" in info:
        meta["normalisation"] = json.dumps(info["normalisation"])
    save_file(state, str(paths["safetensors"]), metadata=meta)
    torch.save(state, paths["pth"])
    paths["json"].write_text(json.dumps(info, indent=2) + "\n")
    # safetensors creates its file with mode 0600; every export gets what the user's umask gives a new file
    mode = 0o666 & ~_umask()
    for path in paths.values():
        os.chmod(path, mode)
    return paths


def normalisation(cfg: Config) -> Dict[str, Any]:
    """What the inputs were normalised with in pretraining: in_chans, per-channel mean and std (in the
    0-1 value space), and the value_range that defines that space (null = uint8 / 255, uint16 / 65535)."""
    d = cfg.data
    return {"in_chans": cfg.model.in_chans, "mean": list(d.mean), "std": list(d.std),
            "value_range": list(d.value_range) if d.value_range is not None else None}


def read_normalisation(path: str | Path) -> Optional[Dict[str, Any]]:
    """The normalisation recorded with an export (its .safetensors metadata or .json beside it), a SimMIM
    state file (its stored config) or a checkpoint directory; None if none is recorded."""
    p = Path(path)
    if p.is_dir():
        return normalisation(load_model_state(str(p))[0])
    side = p.with_suffix(".json")
    if side.is_file():
        try:
            info = json.loads(side.read_text())
            if isinstance(info, dict) and isinstance(info.get("normalisation"), dict):
                return info["normalisation"]
        except ValueError:
            pass
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "normalisation" in meta:
            return json.loads(meta["normalisation"])
        if "config" in meta:
            return normalisation(load_config(json.loads(meta["config"])))
    return None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def create_model_call(model_name: str, kwargs: Dict[str, Any], file: str | Path) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(file)!r}), "
            f"num_classes=N{extra})")


# --------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_weights_arguments
    add_weights_arguments(parser)
    parser.add_argument("--output", "-o", required=True,
                        help="timm: output path without suffix: writes OUTPUT.safetensors, OUTPUT.pth and "
                             "OUTPUT.json; hf: the output folder")
    parser.add_argument("--format", choices=["timm", "hf"], default="timm",
                        help="timm: a timm state dict for fine-tuning (default); hf: a Hugging Face transformers "
                             "folder (Swin: SwinForMaskedImageModeling, SwinV2: Swinv2ForMaskedImageModeling, "
                             "ViT: BeitModel; needs the [hf] extra)")
    parser.add_argument("--model", help="timm model name to export for (default: the timm model of the "
                                        "config's architecture, e.g. swin_base_patch4_window7_224)")
    parser.add_argument("--img-size", type=int, help="fine-tuning image size (default: the named model's, else the "
                                                     "pretraining size)")
    parser.add_argument("--window-size", type=int, help="Swin fine-tuning window (default: the named model's, "
                                                        "else the pretraining window); tables are interpolated")
    parser.add_argument("--vit-rel-pos", choices=["per-block", "shared"], default="per-block",
                        help="ViT: one relative position table per block (BEiT fine-tuning, timm beit_*) or the "
                             "shared one")
    parser.add_argument("--vit-pool", choices=["avg", "token"],
                        help="ViT: target pooling (default: the timm model's; avg -> norm is saved as fc_norm)")


def _main_hf(args: argparse.Namespace) -> int:
    from .hf_export import export_hf, require_transformers  # hf_export imports this module
    given = {"--model": args.model is not None, "--vit-pool": args.vit_pool is not None,
             "--vit-rel-pos": args.vit_rel_pos != "per-block"}
    timm_only = [flag for flag, on in given.items() if on]
    if timm_only:
        raise UserError(f"{', '.join(timm_only)}: timm export options; --format hf takes --img-size and --window-size")
    require_transformers()  # before reading a large checkpoint
    cfg, state = load_source(args.checkpoint, args.config, args.overrides)
    info = export_hf(cfg, state, args.output, args.img_size, args.window_size, source=args.checkpoint)
    print(f"wrote {info['dir']}/: {', '.join(info['files'])} ({info['class']})")
    if not info["exact"]:
        what = ("the continuous position bias uses the pretraining windows" if cfg.model.encoder == "swinv2"
                else "relative position tables were resized")
        print(f"note: exported for another image size / window; {what}, so the outputs differ from the "
              f"pretrained model's")
    if cfg.model.norm_targets and cfg.model.is_swin:
        print(f"note: model.norm_targets is on; transformers' {info['class']} computes its loss on the "
              "raw normalised image")
    d = str(info["dir"])
    print("load with:\n  from transformers import AutoImageProcessor, " + info["class"] +
          f"\n  model = {info['class']}.from_pretrained({d!r}); "
          f"processor = AutoImageProcessor.from_pretrained({d!r})")
    return 0


def main(args: argparse.Namespace) -> int:
    if getattr(args, "format", "timm") == "hf":
        return _main_hf(args)
    from ..cli import output_location
    output_location(Path(str(args.output) + ".safetensors"), "export")
    cfg, state = load_source(args.checkpoint, args.config, args.overrides)
    name, kwargs = timm_target(cfg, args.model, args.img_size, args.window_size, args.vit_rel_pos, args.vit_pool)
    target = build_timm_model(name, kwargs)
    weights = convert_to_timm(encoder_state_dict(state), target)
    info = {"model_name": name, "model_kwargs": kwargs, "source": str(args.checkpoint),
            "normalisation": normalisation(cfg), "pretrain_config": config_to_dict(cfg)}
    paths = save_timm_weights(weights, args.output, info)
    for p in paths.values():
        print(f"wrote {p}")
    print("load with:\n  import timm\n  model = " + create_model_call(name, kwargs, paths["safetensors"]))
    return 0
