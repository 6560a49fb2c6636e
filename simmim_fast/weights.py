"""Model weights in and out: build a SimMIM model from a config or from saved weights, read any
checkpoint into a float32 state dict, write state files.

A *source* of weights is either
- a training checkpoint: an output dir, its ``checkpoints/`` dir or one checkpoint dir (any ZeRO
  stage, or the torch mode), which carries its config; or
- a state-dict file: ``.pt`` / ``.pth`` / ``.bin`` (``torch.save`` of ``SimMIM.state_dict()``, or a
  dict holding it under ``model`` / ``state_dict`` / ``module``, optionally with the config under
  ``config``) or ``.safetensors`` (config JSON optionally in the metadata under ``config``).

An explicit config overrides the one stored with the weights; a file without a stored config needs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .config import Config, config_to_dict, load_config
from .engine.checkpoint import read_model_state, resolve_checkpoint
from .engine.optim import param_groups
from .errors import MissingFileError, UserError
from .models import SimMIM

__all__ = ["STATE_SUFFIXES", "simmim_param_groups", "build_simmim", "load_model_state", "read_state_file",
           "load_source", "save_state_file", "build_timm_model"]

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def simmim_param_groups(model: torch.nn.Module, cfg: Config) -> List[dict]:
    """The optimiser param groups of a SimMIM run (no-decay rules, layer decay); the one call both the
    run and the ZeRO-0 checkpoint reader (which names the fp32 master weights by this order) make.
    ``train.decay_position_bias`` decays what the official pretraining runs decayed (see
    ``SimMIM.official_decayed_names``)."""
    decay_names = model.official_decayed_names() if cfg.train.decay_position_bias else ()
    return param_groups(model, cfg.train.weight_decay, layer_decay=cfg.train.layer_decay, model_cfg=cfg.model,
                        decay_names=decay_names)


def build_simmim(cfg: Config, state: Optional[Dict[str, torch.Tensor]] = None) -> SimMIM:
    """A SimMIM model for ``cfg`` with ``state`` loaded strictly (random init when None), in eval mode."""
    model = SimMIM.from_config(cfg)
    if state is not None:
        own = model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:
            raise UserError(f"the weights do not fit the config's model: {len(wrong)} tensors differ in shape "
                            f"(checkpoint vs config), e.g. {wrong[:3]}; is --config the pretraining config "
                            f"(image size and window fix the relative position tables)?")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"the weights do not fit the config's model ({cfg.model.encoder}, embed_dim "
                f"{cfg.model.embed_dim}, depths {cfg.model.depths}): {len(missing)} missing keys "
                f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}; is --config the "
                f"pretraining config?")
    return model.eval()


def load_model_state(path) -> Tuple[Config, Dict[str, torch.Tensor]]:
    """(Config, float32 SimMIM state dict) from an output dir, a checkpoints dir or a checkpoint dir."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.json")

    def meta_param_groups():
        with torch.device("meta"):
            model = SimMIM.from_config(cfg)
        return model, simmim_param_groups(model, cfg)

    return cfg, read_model_state(ckpt, meta_param_groups)


def _unwrap(obj: dict, path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    stored_cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors: expected a SimMIM state dict (or one under 'model')")
    return tensors, stored_cfg


def read_state_file(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(tensors, stored config data or None) of a .safetensors / .pt / .pth / .bin state file; a file that
    cannot be read (truncated, not a state file) is a UserError naming it."""
    try:
        return _read_state_file(Path(path))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load / safetensors report damage as many exception types
        text = str(e).strip().splitlines()
        raise UserError(f"{path} cannot be read as a state file (truncated or damaged?): {type(e).__name__}: "
                        f"{text[-1] if text else ''}") from None


def _read_state_file(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        stored = json.loads(meta["config"]) if "config" in meta else None
        return load_file(str(path)), stored
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return _unwrap(obj, path)


def load_source(source: str, config: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Tuple[Config, Dict[str, torch.Tensor]]:
    """(config, SimMIM state dict in float32 on the CPU) for a checkpoint dir or a state-dict file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    stored: Optional[dict] = None
    if path.is_dir():
        stored_cfg, state = load_model_state(str(path))
        stored = config_to_dict(stored_cfg)
    elif path.suffix in STATE_SUFFIXES:
        state, stored = read_state_file(path)
    else:
        raise UserError(f"{path}: unknown checkpoint kind; expected a directory or one of {', '.join(STATE_SUFFIXES)}")
    if config is not None:
        cfg = load_config(config, overrides)
    elif stored is not None:
        cfg = load_config(stored, overrides)
    else:
        raise UserError(f"{path} carries no config: pass --config (the pretraining config JSON)")
    return cfg, {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in state.items()}


def save_state_file(path: str, state: Dict[str, torch.Tensor], cfg: Optional[Config] = None) -> None:
    """Write a SimMIM state dict as .safetensors (config JSON in the metadata) or .pt/.pth."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(config_to_dict(cfg)) if cfg is not None else None
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(p),
                  metadata={"config": cfg_json} if cfg_json else None)
    else:
        torch.save({"model": state, **({"config": json.loads(cfg_json)} if cfg_json else {})}, p)


def build_timm_model(model_name: str, kwargs: Dict[str, Any], num_classes: int = 0,
                     device: str | torch.device = "meta") -> torch.nn.Module:
    """A stock timm model (by default on the meta device: shapes only, no memory, no init cost)."""
    import timm
    with torch.device(device):
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
