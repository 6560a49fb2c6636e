"""Checkpoints: layout, atomic commit, keep-last-K, resume state, and reading the model state of any of them.

    <output_dir>/checkpoints/
        latest                      text file: the tag of the newest complete checkpoint
        step_00000100/
            config.json             the resolved config (tools rebuild the model from it alone)
            trainer_state.json      step, epoch, position in the epoch, skipped steps, engine facts
            rng/rank_00000.pt       python, numpy, torch (CPU and CUDA) RNG states of each rank
            deepspeed/              DeepSpeed's files (engine.mode deepspeed), or
            model.pt, optimizer.pt  (engine.mode torch; model.pt = SimMIM.state_dict())
            manifest.json           size and sha256 of every other file, written last

A checkpoint is written under ``.partial-<tag>`` and renamed to ``<tag>`` only after every rank
finished writing; ``latest`` is then replaced atomically (temp file + os.replace). A kill at any
moment leaves ``latest`` naming a complete checkpoint (or no ``latest`` at all).

A file can still be damaged later (a disk, a copy, a user): ``verify_checkpoint`` checks every file
against the manifest and the structure (config, trainer state, one RNG file per rank, the engine's
files), and ``find_resumable`` falls back to the newest checkpoint that passes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..typed_config import config_to_dict
from ..errors import MissingFileError, UserError

__all__ = ["CheckpointError", "CheckpointSaveError", "CheckpointManager", "resolve_checkpoint", "read_model_state",
           "tag_for_step", "read_trainer_state", "capture_rng", "restore_rng", "verify_checkpoint",
           "checkpoint_problem", "find_resumable", "write_manifest", "MANIFEST"]

_TAG = re.compile(r"^step_(\d{8,})$")
MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 22


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


class CheckpointSaveError(UserError, OSError):
    """Writing a checkpoint failed (a full disk, a quota, a vanished folder); the previous one is intact."""


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


def _step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
        if fsync:  # the data must be on disk before the manifest says it is
            os.fsync(f.fileno())
    return h.hexdigest()


def _payload_files(ckpt: Path) -> List[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(ckpt: Path) -> None:
    """``manifest.json``: the size and sha256 of every file of the checkpoint (fsynced first), written last."""
    files = {}
    for p in _payload_files(ckpt):
        rel = p.relative_to(ckpt).as_posix()
        files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
    _write_atomic(ckpt / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({what}): {type(e).__name__}: {e}") from None


def verify_checkpoint(ckpt: Union[str, os.PathLike], deep: bool = True) -> Optional[str]:
    """Check one checkpoint dir; raise CheckpointError naming the first bad file.

    Checked: ``manifest.json`` (every listed file present with its size and, with ``deep``, its sha256),
    ``config.json`` and ``trainer_state.json`` readable, one RNG file per rank of the run that wrote it,
    and the engine's files (model.pt and optimizer.pt in torch mode, a non-empty deepspeed/ otherwise).
    Returns None, or a note for a checkpoint written before manifests existed (its structure is checked,
    its file contents cannot be)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    note = None
    manifest_path = ckpt / MANIFEST
    if manifest_path.is_file():
        manifest = _read_json(manifest_path, "the checkpoint's manifest")
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise CheckpointError(f"{manifest_path} is not a checkpoint manifest (no 'files')")
        for rel, want in files.items():
            p = ckpt / rel
            if not p.is_file():
                raise CheckpointError(f"{p} is missing (listed in {MANIFEST})")
            size = p.stat().st_size
            if size != want.get("size"):
                raise CheckpointError(f"{p} has {size} bytes, the manifest says {want.get('size')} (truncated or "
                                      f"changed after the save)")
            if deep and _sha256(p) != want.get("sha256"):
                raise CheckpointError(f"{p}: sha256 differs from the manifest's (the file was damaged after the save)")
    else:
        note = f"{ckpt} has no {MANIFEST} (written by an older version): its files are present, their contents unverified"
    _read_json(ckpt / "config.json", "the run's config")
    trainer = _read_json(ckpt / "trainer_state.json", "step and data position")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("state"), dict) or "step" not in trainer["state"]:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'} holds no trainer state (no state.step)")
    engine = trainer.get("engine", {}) if isinstance(trainer.get("engine"), dict) else {}
    for r in range(int(engine.get("world_size", 1))):
        rng = ckpt / "rng" / f"rank_{r:05d}.pt"
        if not rng.is_file():
            raise CheckpointError(f"{rng} is missing (the RNG state of rank {r})")
    if engine.get("mode", "torch") == "torch" and not (ckpt / "deepspeed").is_dir():
        for name in ("model.pt", "optimizer.pt"):
            if not (ckpt / name).is_file():
                raise CheckpointError(f"{ckpt / name} is missing")
    elif not (ckpt / "deepspeed").is_dir() or not any((ckpt / "deepspeed").iterdir()):
        raise CheckpointError(f"{ckpt / 'deepspeed'} is missing or empty (DeepSpeed's model and optimiser states)")
    return note


def checkpoint_problem(ckpt: Union[str, os.PathLike], deep: bool = True) -> Optional[str]:
    """What is wrong with a checkpoint, or None if ``verify_checkpoint`` passes."""
    try:
        verify_checkpoint(ckpt, deep)
    except CheckpointError as e:
        return str(e)
    return None


def _latest_tag(root: Path) -> Optional[str]:
    try:
        tag = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if _TAG.match(tag) else None


def find_resumable(root: Union[str, os.PathLike]) -> Tuple[Optional[Path], List[str], Optional[str]]:
    """(newest verified checkpoint under ``root`` or None, what was wrong with each newer one, a note).

    Candidates are the ``step_*`` dirs up to the step ``latest`` names (all of them if ``latest`` is
    missing or unreadable), newest first; steps after ``latest`` belong to a run that was resumed from
    an earlier checkpoint and are not candidates."""
    root = Path(root)
    if not root.is_dir():
        return None, [], None
    tags = sorted((d.name for d in root.iterdir() if d.is_dir() and _TAG.match(d.name)), key=_step_of, reverse=True)
    latest = _latest_tag(root)
    problems: List[str] = []
    if latest is not None and (root / latest).is_dir():
        tags = [t for t in tags if _step_of(t) <= _step_of(latest)]
    elif (root / "latest").exists():  # it names nothing usable: say so, then try the older ones
        problems.append(f"{root / 'latest'} names {latest or 'nothing readable'!r}, which is not a complete "
                        f"checkpoint" + (f" ({root / latest} does not exist)" if latest else ""))
    for tag in tags:
        try:
            note = verify_checkpoint(root / tag)
        except CheckpointError as e:
            problems.append(f"{tag}: {e}")
            continue
        return root / tag, problems, note
    return None, problems, None


def resolve_checkpoint(path: Union[str, os.PathLike], verify: bool = True) -> Path:
    """One checkpoint dir from an output dir, a checkpoints dir (via ``latest``) or a checkpoint dir;
    with ``verify``, checked by ``verify_checkpoint`` (a CheckpointError names the bad file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"checkpoint path does not exist: {p}")
    if _is_checkpoint(p):
        if verify:
            verify_checkpoint(p)
        return p
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            ckpt = root / tag
            if not _is_checkpoint(ckpt):
                if ckpt.is_dir():
                    verify_checkpoint(ckpt)  # names the missing file
                raise CheckpointError(f"{latest} names {tag!r}, but {ckpt} is not a complete checkpoint")
            if verify:
                verify_checkpoint(ckpt)
            return ckpt
    if _TAG.match(p.name) and p.is_dir():  # a checkpoint dir with its trainer state or config gone
        verify_checkpoint(p)
    raise CheckpointError(f"no checkpoint at {p}: expected a checkpoint dir (with trainer_state.json), a "
                          f"checkpoints dir or an output dir with a 'latest' file")


def read_trainer_state(ckpt: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


class CheckpointManager:
    """Saves and finds checkpoints under ``<output_dir>/checkpoints`` (all ranks call save, rank 0 commits)."""

    def __init__(self, output_dir: Union[str, Path], rank: int, keep_last: int, barrier,
                 any_rank: Optional[Callable[[bool], bool]] = None):
        """``any_rank(flag) -> bool``: True on every rank if it is True on any (an all-reduce); lets all
        ranks stop together when the save failed on some of them."""
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier
        self.any_rank = any_rank or (lambda flag: flag)

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
        # This step may be saved already (the end of a run that stopped at a save); a damaged copy is replaced.
        if final.is_dir() and not self.any_rank(checkpoint_problem(final) is not None):
            return final
        tmp = self.root / f".partial-{tag}"
        failed: Optional[BaseException] = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            except OSError as e:
                failed = e
        self.barrier()
        if failed is None:
            try:
                if not (tmp / "rng").is_dir():  # rank 0 made it before the barrier: a shared file system is needed
                    raise FileNotFoundError(errno.ENOENT, "checkpoint folder not visible on this rank", str(tmp))
                write_engine_state(tmp)
                torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                failed = e
        self._raise_if_failed(step, tmp, failed)
        if self.rank == 0:
            try:
                (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
                _write_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
                write_manifest(tmp)  # last: sizes and checksums of everything above
                _fsync_dir(tmp)
            except OSError as e:
                failed = e
        self._raise_if_failed(step, tmp, failed)
        if self.rank == 0:
            if final.exists():  # a damaged checkpoint of the same step: replaced by this one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / "latest", tag + "\n")
            self._prune(keep=tag)
        self.barrier()
        return final

    def _raise_if_failed(self, step: int, tmp: Path, failed: Optional[BaseException]) -> None:
        """All ranks learn whether any rank failed to write; then all raise the same error."""
        if not self.any_rank(failed is not None):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # free the space the half-written checkpoint took
        self.barrier()
        previous = self.tags()
        if isinstance(failed, OSError):
            why = f"{failed.strerror or failed}" + (f" ({failed.filename})" if failed.filename else "")
        elif failed is not None:
            why = f"{type(failed).__name__}: {str(failed).strip().splitlines()[-1] if str(failed).strip() else ''}"
        else:
            why = "another rank failed to write its part"
        full = isinstance(failed, OSError) and failed.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = (" Free disk space (or choose another --output-dir) and run the same command again" if full else
                " Fix the cause and run the same command again")
        raise CheckpointSaveError(
            f"could not write the checkpoint of step {step} under {self.root}: {why}. The previous checkpoint "
            f"({previous[-1] if previous else 'none'}) is intact; training stopped.{hint} to resume from it")

    def _prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``keep``; newer ones (a run resumed from an earlier
        checkpoint left them) stay until this run passes their step."""
        upto = [t for t in self.tags() if _step_of(t) <= _step_of(keep)]
        for old in upto[:-self.keep_last]:
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
