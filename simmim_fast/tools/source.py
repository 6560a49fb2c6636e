"""Where a tool gets a pretrained SimMIM model from.

A *source* is either
- a training checkpoint: an output dir, its ``checkpoints/`` dir or one checkpoint dir (any ZeRO
  stage), read through ``simmim_fast.engine.checkpoint.load_model_state``, which also returns the
  config saved with it; or
- a state-dict file: ``.pt`` / ``.pth`` / ``.bin`` (``torch.save`` of ``SimMIM.state_dict()``, or a
  dict holding it under ``model`` / ``state_dict`` / ``module``, optionally with the config under
  ``config``) or ``.safetensors`` (config JSON optionally in the metadata under ``config``).

``--config`` overrides the config stored with the weights; a file without a stored config needs it.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..config import Config, config_to_dict, load_config

__all__ = ["add_source_arguments", "load_source", "build_simmim", "save_state_file", "user_errors", "STATE_SUFFIXES"]

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def add_source_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("checkpoint", nargs=None if required else "?",
                        help="pretraining output dir, checkpoints dir, one checkpoint dir, or a SimMIM "
                             "state-dict file (.pt/.pth/.bin/.safetensors)")
    parser.add_argument("--config", help="config JSON (needed when the weights carry none; overrides the "
                                         "stored config otherwise)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.img_size=224 (repeatable)")


def _unwrap(obj: dict, path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    stored_cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors: expected a SimMIM state dict (or one under 'model')")
    return tensors, stored_cfg


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
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return _unwrap(obj, path)


def load_source(source: str, config: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Tuple[Config, Dict[str, torch.Tensor]]:
    """(config, SimMIM state dict in float32 on the CPU) for a checkpoint dir or a state-dict file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    stored: Optional[dict] = None
    if path.is_dir():
        try:
            from ..engine.checkpoint import load_model_state
        except ImportError as e:
            raise RuntimeError(f"{path} is a directory, which needs the training engine "
                               f"(simmim_fast.engine.checkpoint) to read; it is not importable here ({e}). "
                               f"Pass a state-dict file (.pt/.pth/.safetensors) with --config instead") from e
        stored_cfg, state = load_model_state(str(path))
        stored = config_to_dict(stored_cfg) if isinstance(stored_cfg, Config) else stored_cfg
    elif path.suffix in STATE_SUFFIXES:
        state, stored = _read_state_file(path)
    else:
        raise ValueError(f"{path}: unknown checkpoint kind; expected a directory or one of {', '.join(STATE_SUFFIXES)}")
    if config is not None:
        cfg = load_config(config, overrides)
    elif stored is not None:
        cfg = load_config(stored, overrides)
    else:
        raise ValueError(f"{path} carries no config: pass --config (the pretraining config JSON)")
    return cfg, _float_cpu(state)


def _float_cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in state.items()}


def build_simmim(cfg: Config, state: Optional[Dict[str, torch.Tensor]] = None):
    """A SimMIM model for ``cfg`` with ``state`` loaded strictly (random init when None), in eval mode."""
    from ..models import SimMIM
    model = SimMIM.from_config(cfg)
    if state is not None:
        own = model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"the weights do not fit the config's model: {len(wrong)} tensors differ in shape "
                             f"(checkpoint vs config), e.g. {wrong[:3]}; is --config the pretraining config "
                             f"(image size and window fix the relative position tables)?")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the weights do not fit the config's model ({cfg.model.encoder}, embed_dim "
                f"{cfg.model.embed_dim}, depths {cfg.model.depths}): {len(missing)} missing keys "
                f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}; is --config the "
                f"pretraining config?")
    return model.eval()


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


def user_errors(main):
    """Wrap a subcommand's ``main``: a bad input (ValueError, including ConfigError, or a missing file)
    prints ``error: <message>`` and returns 2 instead of a traceback."""
    @functools.wraps(main)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return main(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    return wrapped
