"""One run assembly for every training job: output dir, resume, distributed setup, backend, schedule,
checkpoints, logger and trainer, built from the config. Knows no SimMIM: a job passes callables.

    cfg, out, resume_path, precision = prepare(cfg, output_dir, resume)   # before any heavy work
    run(cfg, out, resume_path, precision, build_model=..., build_loader=..., loss_label="...")

``prepare`` checks what can be checked without starting an engine (writable output dir, DeepSpeed
importable, the precision possible here, --resume, the checkpoint holds the same model); ``run``
owns everything from the process group to the last checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..config import Config
from ..errors import UserError
from ..typed_config import config_to_dict
from .backends import build_backend
from .checkpoint import (CheckpointError, CheckpointManager, find_resumable, read_trainer_state, resolve_checkpoint,
                         verify_checkpoint)
from .dist import DistInfo, RankAgreement, barrier, init_distributed, set_cpu_threads, shutdown
from .ds_config import resolve_precision
from .metrics import MetricsLogger
from .schedule import LRSchedule
from .trackers import build_trackers, check_tracker_packages
from .trainer import TrainState, Trainer

__all__ = ["RunContext", "prepare", "resolve_resume", "run", "gathered", "setup_logging", "lock_output_dir",
           "release_output_dir", "LOCK_FILE"]

# Config sections that fix the model a checkpoint holds: resuming with others is refused.
MODEL_SECTIONS = ("model", "mask")


@dataclass
class RunContext:
    """What a job's callables get: the config, the output dir, the process group facts, the backend
    (after it is built) and the loader (after it is built)."""
    cfg: Config
    out: Path
    dist: DistInfo
    backend: Any = None
    loader: Any = None
    logger: Any = None   # the MetricsLogger (after it is built; on_step callbacks may log images through it)
    steps_per_epoch: int = 0
    total_steps: int = 0


LOCK_FILE = "run.lock"
_LOCKS = {}  # resolved output dir -> fd of the lock this process holds on it


def lock_output_dir(out: Path) -> None:
    """Refuse a second run on the same output dir while one is running (UserError naming the holder).

    Global rank 0 holds an exclusive ``flock`` on ``<out>/run.lock`` for the whole run; the kernel drops it
    when the process ends, however it ends (kill -9 included), so a lock file left by a dead run is simply
    taken over. File systems without flock support (some network mounts) get a warning, no lock."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    key = str(out.resolve())
    if key in _LOCKS:
        return
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"output dir {out} is in use by another run ({holder}, holding {path}); wait for it to "
                            f"end, or choose another --output-dir") from None
        os.close(fd)
        _warn(f"cannot lock {path} ({e.strerror}): this file system does not support flock, so a second run on "
              f"the same output dir is not refused")
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _LOCKS[key] = fd


def release_output_dir(out: Path) -> None:
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output dir {out} is not writable: {e.strerror or e}; choose another --output-dir") from None


def _warn(text: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def resolve_resume(resume: str, out: Path, cfg: Config, model_sections: Sequence[str] = MODEL_SECTIONS
                   ) -> Optional[Path]:
    """The checkpoint to resume from ('auto', 'none' or a path), or None; refuses a checkpoint of another model.

    'auto' verifies the checkpoint it picks (checkpoint.verify_checkpoint) and falls back to the newest one
    that passes, with a warning naming what was wrong with each newer one; none passing is an error. An
    explicit path that fails verification is an error naming the bad file."""
    ckpt_root = out / "checkpoints"
    if resume == "none":
        if (ckpt_root / "latest").is_file():
            raise UserError(f"--resume none, but {out} already holds checkpoints; use --resume auto to continue, "
                            f"or another --output-dir")
        return None
    note = None
    try:
        if resume == "auto":
            path, problems, note = find_resumable(ckpt_root)
            if path is None and problems:
                raise UserError(f"no usable checkpoint in {ckpt_root}: " + "; ".join(problems)
                                + ". Restore the files, resume from elsewhere with --resume PATH, or start over "
                                  "with --resume none and another --output-dir")
            for problem in problems:
                _warn(f"skipping checkpoint {problem}; resuming from {path.name} instead")
        else:
            path = resolve_checkpoint(resume, verify=False)
            note = verify_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(f"--resume {resume}: {e}") from None
    if note:
        _warn(note)
    if path is not None:
        _check_same_model(cfg, path, model_sections)
    return path


def _check_same_model(cfg: Config, ckpt: Path, sections: Sequence[str]) -> None:
    saved = json.loads((ckpt / "config.json").read_text())
    now = config_to_dict(cfg)
    diffs = [f"{sec}.{k}: checkpoint {saved.get(sec, {}).get(k)!r}, now {v!r}"
             for sec in sections for k, v in now[sec].items() if saved.get(sec, {}).get(k) != v]
    if diffs:
        raise UserError(f"cannot resume from {ckpt}: the config differs from the checkpoint's in "
                        f"{'; '.join(diffs)}. Use the same model config, or --resume none with a new --output-dir")


def prepare(cfg: Config, output_dir: Optional[str], resume: str) -> Tuple[Path, Optional[Path], str]:
    """(output dir, checkpoint to resume or None, precision): every check that needs no engine."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg.train.accumulation_steps(world)  # ConfigError if the batch sizes do not divide
    out = Path(output_dir or Path("runs") / cfg.name).expanduser()
    _check_writable(out)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg, "cuda" if cuda else "cpu")
    if precision == "fp16" and not cuda:
        raise UserError("config key 'engine.precision' = \"fp16\" needs CUDA (no GPU here); use fp32 or bf16")
    if cfg.engine.mode == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("engine.mode 'deepspeed' needs the deepspeed package (pip install deepspeed), or "
                            "run the plain PyTorch engine with --set engine.mode=torch") from None
        half_weights = precision == "fp16" or (precision == "bf16" and cfg.engine.bf16_weights)
        if cfg.train.nan_policy == "skip" and cfg.engine.zero_stage == 0 and not half_weights:
            raise UserError("config key 'train.nan_policy' = \"skip\" needs engine.zero_stage >= 1 in deepspeed "
                            "mode with fp32 weights (DeepSpeed skips non-finite updates only inside its ZeRO and "
                            "half-precision optimisers); set engine.zero_stage=1 or engine.mode=torch")
    check_tracker_packages(cfg)
    lock_output_dir(out)  # released by run(), or here if resuming is refused
    try:
        return out, resolve_resume(resume, out, cfg), precision
    except BaseException:
        release_output_dir(out)
        raise


def gathered(module: torch.nn.Module, cfg: Config):
    """A context in which every rank holds ``module``'s full parameters (ZeRO-3 partitions them)."""
    if cfg.engine.mode == "deepspeed" and cfg.engine.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()


def setup_logging(rank: int) -> None:
    """The package's own log lines (e.g. the data loader's file reports): INFO on rank 0, warnings elsewhere."""
    logger = logging.getLogger("simmim_fast")
    # Only where nobody configured logging: an application's (or pytest's) root handlers get the
    # records through propagation instead, and nothing is printed twice.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(cfg: Config, out: Path, resume_path: Optional[Path], precision: str, *,
        build_model: Callable[[RunContext], Tuple[torch.nn.Module, List[dict]]],
        build_loader: Callable[[RunContext], Any],
        loss_label: str,
        on_step: Optional[Callable[[RunContext], Optional[Callable[[TrainState], Optional[dict]]]]] = None,
        describe: Optional[Callable[[RunContext], str]] = None) -> TrainState:
    """Train ``cfg`` to its end (or max_steps) and return the final state.

    build_model(ctx) -> (model whose forward returns the loss, optimiser param groups), called after
        the process group exists and the seed is set (identical initial weights on every rank).
    build_loader(ctx) -> a loader with ``micro_batches_per_epoch`` and ``epoch(epoch, start_step)``.
    on_step(ctx) -> an optional per-optimiser-step callback, made once the trainer's parts exist (ctx.logger
        included); it may return a dict of scalars for that step (see Trainer).
    describe(ctx) -> an extra start-up line (rank 0).
    """
    dist = init_distributed(cfg.engine.mode, cfg.engine.dist_backend)
    setup_logging(dist.rank)
    threads = set_cpu_threads(cfg.engine.cpu_threads, dist)
    ctx = RunContext(cfg=cfg, out=out, dist=dist)
    try:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model, groups = build_model(ctx)
        ctx.backend = build_backend(model, groups, cfg, dist, precision)
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank)  # per-rank stream for drop path
        ctx.loader = build_loader(ctx)
        ctx.steps_per_epoch = ctx.loader.micro_batches_per_epoch // ctx.backend.accumulation
        if ctx.steps_per_epoch < 1:
            raise UserError(f"the data gives {ctx.loader.micro_batches_per_epoch} micro-batches per rank per epoch, "
                            f"fewer than one optimiser step needs ({ctx.backend.accumulation}); lower "
                            f"train.global_batch_size / train.micro_batch_size or add images")
        schedule = LRSchedule.from_config(cfg.train, ctx.steps_per_epoch)
        agree = RankAgreement(dist.world_size)
        checkpoints = CheckpointManager(out, dist.rank, cfg.checkpoint.keep_last, barrier, any_rank=agree.any)
        checkpoints.clean_partial()
        ctx.total_steps = cfg.train.epochs * ctx.steps_per_epoch
        if cfg.train.max_steps is not None:
            ctx.total_steps = min(ctx.total_steps, cfg.train.max_steps)
        if dist.is_main:
            _announce(ctx, threads, describe)
        start_step = read_trainer_state(resume_path)["state"]["step"] if resume_path is not None else 0
        trackers = (build_trackers(cfg, out, config_to_dict(cfg), resuming=start_step > 0) if dist.is_main else [])
        ctx.logger = MetricsLogger(out, dist.is_main, ctx.total_steps, start_step, cfg.logging.tensorboard,
                                   cfg.logging.progress_bar, cfg.name, loss_label, trackers)
        trainer = Trainer(
            backend=ctx.backend, loader=ctx.loader, schedule=schedule, steps_per_epoch=ctx.steps_per_epoch,
            epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, global_batch_size=cfg.train.global_batch_size,
            nan_policy=cfg.train.nan_policy, max_skipped_steps=cfg.train.max_skipped_steps, checkpoints=checkpoints,
            checkpoint_every=cfg.checkpoint.every_steps, save_at_end=cfg.checkpoint.save_at_end, logger=ctx.logger,
            print_every=cfg.logging.print_every, world_size=dist.world_size, config=cfg,
            loss_curve=cfg.logging.loss_curve, on_step=on_step(ctx) if on_step is not None else None,
            agree=agree, rank=dist.rank)
        state = None
        if resume_path is not None:
            state = trainer.resume(resume_path, dist.rank)
            if dist.is_main:
                print(f"resumed from {resume_path} at step {state.step} (epoch {state.epoch})", flush=True)
        state = trainer.fit(state)
        if dist.is_main:
            print(f"done: {state.step} steps, {state.skipped_steps} skipped; outputs in {out}", flush=True)
        return state
    except BaseException:
        if ctx.logger is not None:
            ctx.logger.close(failed=True)
        raise
    finally:
        if ctx.loader is not None:
            ctx.loader.close()
        shutdown()
        release_output_dir(out)


def _announce(ctx: RunContext, threads: int, describe) -> None:
    cfg, backend, dist = ctx.cfg, ctx.backend, ctx.dist
    resolved = config_to_dict(cfg)
    (ctx.out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    print("resolved config:\n" + json.dumps(resolved, indent=2), flush=True)
    if cfg.engine.mode == "deepspeed":
        (ctx.out / "deepspeed_config.json").write_text(json.dumps(backend.ds_config, indent=2) + "\n")
        print("DeepSpeed config:\n" + json.dumps(backend.ds_config, indent=2), flush=True)
    if describe is not None:
        print(describe(ctx), flush=True)
    print(f"engine: {backend.engine_facts()} compile={backend.compiled} device={dist.device} "
          f"steps/epoch={ctx.steps_per_epoch} total steps={ctx.total_steps} output dir={ctx.out}"
          + (f" cpu threads={threads}" if dist.device.type == "cpu" else ""), flush=True)
