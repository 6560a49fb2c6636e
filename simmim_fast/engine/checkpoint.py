"""Checkpoints: layout, atomic commit, keep-last-K, resume state, and reading the model state of any of them.

    <output_dir>/checkpoints/
        latest                      text file: the tag of the newest complete checkpoint
        step_00000100/
            config.json             the resolved config (tools rebuild the model from it alone)
            trainer_state.json      step, epoch, position in the epoch, skipped steps, engine facts
            rng/rank_00000.pt       python, numpy, torch (CPU and CUDA) RNG states of each rank
            deepspeed/              DeepSpeed's files (engine.mode deepspeed), or
            model.pt, optimizer.pt  (engine.mode torch; model.pt = SimMIM.state_dict())

A checkpoint is written under ``.partial-<tag>`` and renamed to ``<tag>`` only after every rank
finished writing; ``latest`` is then replaced atomically (temp file + os.replace). A kill at any
moment leaves ``latest`` naming a complete checkpoint (or no ``latest`` at all).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..typed_config import config_to_dict
from ..errors import MissingFileError, UserError

__all__ = ["CheckpointError", "CheckpointManager", "resolve_checkpoint", "read_model_state", "tag_for_step",
           "read_trainer_state", "capture_rng", "restore_rng"]

_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def capture_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_checkpoint(d: Path) -> bool:
    return (d / "trainer_state.json").is_file() and (d / "config.json").is_file()


def resolve_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """One checkpoint dir from an output dir, a checkpoints dir (via ``latest``) or a checkpoint dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"checkpoint path does not exist: {p}")
    if _is_checkpoint(p):
        return p
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            ckpt = root / tag
            if not _is_checkpoint(ckpt):
                raise CheckpointError(f"{latest} names {tag!r}, but {ckpt} is not a complete checkpoint")
            return ckpt
    raise CheckpointError(f"no checkpoint at {p}: expected a checkpoint dir (with trainer_state.json), a "
                          f"checkpoints dir or an output dir with a 'latest' file")


def read_trainer_state(ckpt: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


class CheckpointManager:
    """Saves and finds checkpoints under ``<output_dir>/checkpoints`` (all ranks call save, rank 0 commits)."""

    def __init__(self, output_dir: Union[str, Path], rank: int, keep_last: int, barrier):
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier

    def tags(self) -> List[str]:
        if not self.root.is_dir():
            return []
        found = [d.name for d in self.root.iterdir() if d.is_dir() and _TAG.match(d.name) and _is_checkpoint(d)]
        return sorted(found, key=lambda t: int(_TAG.match(t).group(1)))

    def clean_partial(self) -> None:
        """Remove leftovers of saves that were killed (rank 0, before training starts)."""
        if self.rank == 0 and self.root.is_dir():
            for d in self.root.glob(".partial-*"):
                shutil.rmtree(d, ignore_errors=True)
        self.barrier()

    def save(self, step: int, cfg: Config, trainer_state: Dict[str, Any], write_engine_state) -> Path:
        """Write a checkpoint for ``step``. ``write_engine_state(dir)`` is called on every rank and must
        write the model/optimiser state into ``dir`` (collectively for DeepSpeed)."""
        tag = tag_for_step(step)
        final = self.root / tag
        if _is_checkpoint(final):
            return final  # this step is already saved (e.g. the end of a run that stopped at a save)
        tmp = self.root / f".partial-{tag}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.barrier()
        write_engine_state(tmp)
        torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        self.barrier()
        if self.rank == 0:
            (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
            # trainer_state.json last: its presence marks the checkpoint complete
            _write_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # an incomplete dir of the same name (cannot come from us; keep it out of the way)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / "latest", tag + "\n")
            self._prune(keep=tag)
        self.barrier()
        return final

    def _prune(self, keep: str) -> None:
        tags = self.tags()
        for old in tags[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)


def _ds_stage(ckpt: Path) -> int:
    return int(read_trainer_state(ckpt).get("engine", {}).get("zero_stage", 0))


def _bf16_optimizer_state(ds_dir: Path) -> Dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 weights and fp32
    gradient accumulation), which zero_to_fp32 does not read: each rank holds a slice of every param group's
    flat fp32 master copy, and ``param_slice_mappings`` says which part of which parameter it is."""
    model_files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    rank_files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                        key=lambda f: int(re.search(r"pp_rank_(\d+)_", f.name).group(1)))
    model = torch.load(model_files[0], map_location="cpu", weights_only=False)
    pieces: Dict[str, List[torch.Tensor]] = {}
    for f in rank_files:
        opt = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    state: Dict[str, torch.Tensor] = {}
    for shapes in model["param_shapes"]:
        for name, shape in shapes.items():
            if name not in pieces:
                raise CheckpointError(f"{ds_dir}: no fp32 master weights for parameter {name}")
            full = torch.cat(pieces[name])
            if full.numel() != torch.Size(shape).numel():
                raise CheckpointError(f"{ds_dir}: parameter {name} has {full.numel()} master values, expected "
                                      f"{torch.Size(shape).numel()} for shape {tuple(shape)}")
            state[name] = full.view(shape).clone()
    for name, value in model["module"].items():  # buffers (and nothing else) come from the module states
        state.setdefault(name, value)
    return state


def _zero0_half_state(model_states: Dict[str, Any], meta_param_groups: Callable[[], Tuple[nn.Module, List[dict]]]
                      ) -> Dict[str, torch.Tensor]:
    """ZeRO-0 with bf16/fp16 weights: DeepSpeed's half-precision optimiser keeps the fp32 master weights as
    per-group lists in the optimiser's param-group order; ``meta_param_groups()`` rebuilds the model (on the
    meta device) and those groups, with the same builder the run used, to name them."""
    model, groups = meta_param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    masters = model_states["optimizer"]["fp32_groups"]
    if [len(g["params"]) for g in groups] != [len(m) for m in masters]:
        raise CheckpointError("ZeRO-0 checkpoint: the fp32 master groups do not match the model's param groups")
    state = dict(model_states["module"])
    for group, master in zip(groups, masters):
        for p, value in zip(group["params"], master):
            state[names[id(p)]] = value.view(p.shape)
    return state


def read_model_state(ckpt: Union[str, os.PathLike],
                     meta_param_groups: Callable[[], Tuple[nn.Module, List[dict]]]) -> Dict[str, torch.Tensor]:
    """The full-precision model state dict of one checkpoint dir, for the torch mode and DeepSpeed
    checkpoints of any ZeRO stage (ZeRO 1-3 consolidated from the fp32 master partitions with
    DeepSpeed's zero_to_fp32). ``meta_param_groups() -> (model, param groups)`` is needed only for
    ZeRO-0 with half-precision weights (see ``_zero0_half_state``)."""
    ckpt = Path(ckpt)
    if (ckpt / "model.pt").is_file():
        state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    elif (ckpt / "deepspeed").is_dir():
        if _ds_stage(ckpt) == 0:
            files = sorted((ckpt / "deepspeed").glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{ckpt / 'deepspeed'} has no mp_rank_*_model_states.pt")
            model_states = torch.load(files[0], map_location="cpu", weights_only=False)
            if isinstance(model_states.get("optimizer"), dict) and "fp32_groups" in model_states["optimizer"]:
                state = _zero0_half_state(model_states, meta_param_groups)
            else:
                state = model_states["module"]
        elif list((ckpt / "deepspeed").glob("bf16_zero_pp_rank_*_optim_states.pt")):
            state = _bf16_optimizer_state(ckpt / "deepspeed")
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    else:
        raise CheckpointError(f"{ckpt} holds neither model.pt (torch mode) nor deepspeed/ (DeepSpeed mode)")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
