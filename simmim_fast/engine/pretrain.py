"""SimMIM pretraining: the edge where SimMIM meets the generic engine (train.py calls ``main``).

    python train.py --config configs/swin_tiny_cpu.json            # one process (CPU or one GPU)
    deepspeed train.py --config configs/swin_l.json                # all local GPUs
    deepspeed --num_gpus 2 train.py --config ...                   # two ranks (gloo on the CPU)

Every input is checked before any heavy work (process group, DeepSpeed, model): a bad config key,
a missing or empty dataset, an unwritable output dir or a bad --resume each give one clear error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import List, Optional

__all__ = ["add_arguments", "main", "run", "UsageError", "preflight"]


class UsageError(Exception):
    """A problem with the command line, the config or the environment, found before training starts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config JSON file (see docs/CONFIG.md)")
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints, metrics.jsonl, TensorBoard logs and loss_curve.png go "
                             "(default: runs/<config name>)")
    parser.add_argument("--data-path", default=None, help="dataset path; same as --set data.path=PATH")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.base_lr=1e-4 (repeatable; JSON values)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (continue from <output-dir>/checkpoints/latest if there is one), 'none' "
                             "(start fresh; the output dir must hold no checkpoints), or a checkpoint path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output dir {out} is not writable: {e.strerror or e}; choose another --output-dir") from None


def preflight(args: argparse.Namespace):
    """Everything that can be checked without starting the engine. Returns (cfg, output_dir, resume)."""
    from ..config import ConfigError, load_config
    from ..data.files import list_images
    from .checkpoint import CheckpointError, resolve_checkpoint
    from .ds_config import resolve_precision

    overrides = list(args.overrides)
    if args.data_path is not None:
        overrides.append(f"data.path={json.dumps(args.data_path)}")
    try:
        cfg = load_config(args.config, overrides=overrides)
    except (ConfigError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        accumulation = cfg.train.accumulation_steps(world)
    except ConfigError as e:
        raise UsageError(str(e)) from None

    out = Path(args.output_dir or Path("runs") / cfg.name).expanduser()
    _check_writable(out)

    import torch
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg, "cuda" if cuda else "cpu")
    if precision == "fp16" and not cuda:
        raise UsageError("config key 'engine.precision' = \"fp16\" needs CUDA (no GPU here); use fp32 or bf16")
    if cfg.engine.mode == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UsageError("engine.mode 'deepspeed' needs the deepspeed package (pip install deepspeed), or "
                             "run the plain PyTorch engine with --set engine.mode=torch") from None
        half_weights = precision == "fp16" or (precision == "bf16" and cfg.engine.bf16_weights)
        if cfg.train.nan_policy == "skip" and cfg.engine.zero_stage == 0 and not half_weights:
            raise UsageError("config key 'train.nan_policy' = \"skip\" needs engine.zero_stage >= 1 in deepspeed "
                             "mode with fp32 weights (DeepSpeed skips non-finite updates only inside its ZeRO and "
                             "half-precision optimisers); set engine.zero_stage=1 or engine.mode=torch")

    if cfg.data.backend != "synthetic":
        try:
            n = len(list_images(cfg.data.path, cfg.data.layout))
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise UsageError(str(e)) from None
        micro_steps = (n // world) // cfg.train.micro_batch_size
        if micro_steps < accumulation:
            raise UsageError(
                f"dataset {cfg.data.path or '(sample photos)'} has {n} images: {micro_steps} micro-batches per rank "
                f"per epoch, fewer than one optimiser step needs ({accumulation} accumulation steps x "
                f"train.micro_batch_size {cfg.train.micro_batch_size} x {world} ranks); lower "
                f"train.global_batch_size / train.micro_batch_size or add images")

    resume = args.resume
    ckpt_root = out / "checkpoints"
    if resume == "none":
        if (ckpt_root / "latest").is_file():
            raise UsageError(f"--resume none, but {out} already holds checkpoints; use --resume auto to continue, "
                             f"or another --output-dir")
        resume_path = None
    elif resume == "auto":
        try:
            resume_path = resolve_checkpoint(ckpt_root) if (ckpt_root / "latest").is_file() else None
        except CheckpointError as e:
            raise UsageError(f"--resume auto: {e}") from None
    else:
        try:
            resume_path = resolve_checkpoint(resume)
        except (FileNotFoundError, CheckpointError) as e:
            raise UsageError(f"--resume {resume}: {e}") from None
    if resume_path is not None:
        _check_same_model(cfg, resume_path)
    return cfg, out, resume_path, precision


def _check_same_model(cfg, ckpt: Path) -> None:
    """A checkpoint resumes only the model it holds: the model and mask sections must match."""
    from ..config import config_to_dict
    saved = json.loads((ckpt / "config.json").read_text())
    now = config_to_dict(cfg)
    diffs = [f"{sec}.{k}: checkpoint {saved.get(sec, {}).get(k)!r}, now {v!r}"
             for sec in ("model", "mask") for k, v in now[sec].items() if saved.get(sec, {}).get(k) != v]
    if diffs:
        raise UsageError(f"cannot resume from {ckpt}: the config differs from the checkpoint's in "
                         f"{'; '.join(diffs)}. Use the same model config, or --resume none with a new --output-dir")


def _reconstruction_callback(cfg, backend, loader, out: Path, is_main: bool):
    """logging.visualize_every: a reconstruction grid PNG (simmim_fast.visualization) of a fixed batch."""
    every = cfg.logging.visualize_every
    if not every:
        return None
    images, mask = next(iter(loader.epoch(0)))
    images, mask = images[:8], mask[:8]
    (out / "reconstructions").mkdir(exist_ok=True)

    def callback(state) -> None:
        if state.step % every:
            return
        from ..visualization import reconstruction_grid, save_png_atomically
        with _gathered(backend.module, cfg):  # every rank takes part in a ZeRO-3 gather
            grid = reconstruction_grid(backend.module, images, mask, cfg.data.mean, cfg.data.std)
        if is_main:
            save_png_atomically(grid, out / "reconstructions" / f"step_{state.step:08d}.png")
    return callback


def _gathered(module, cfg):
    import contextlib
    if cfg.engine.mode == "deepspeed" and cfg.engine.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()


def _setup_logging(rank: int) -> None:
    """The package's own log lines (e.g. the data loader's file reports): INFO on rank 0, warnings elsewhere."""
    import logging
    logger = logging.getLogger("simmim_fast")
    # Only where nobody configured logging: an application's (or pytest's) root handlers get the
    # records through propagation instead, and nothing is printed twice.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    cfg, out, resume_path, precision = preflight(args)

    import torch

    from ..config import config_to_dict
    from ..data import build_pretrain_loader
    from ..models import SimMIM
    from .backends import build_backend
    from .checkpoint import CheckpointManager
    from .dist import barrier, init_distributed, set_cpu_threads, shutdown
    from .metrics import MetricsLogger
    from .optim import param_groups
    from .schedule import LRSchedule
    from .trainer import Trainer

    dist = init_distributed(cfg.engine.mode, cfg.engine.dist_backend)
    _setup_logging(dist.rank)
    threads = set_cpu_threads(cfg.engine.cpu_threads, dist)
    loader = None
    try:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = SimMIM.from_config(cfg)
        groups = param_groups(model, cfg.train.weight_decay, layer_decay=cfg.train.layer_decay, model_cfg=cfg.model)
        backend = build_backend(model, groups, cfg, dist, precision)
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank)  # per-rank stream for drop path
        loader = build_pretrain_loader(cfg, dist.rank, dist.world_size, dist.device, log_dir=out)
        steps_per_epoch = loader.steps_per_epoch // backend.accumulation
        schedule = LRSchedule.from_config(cfg.train, steps_per_epoch)
        checkpoints = CheckpointManager(out, dist.rank, cfg.checkpoint.keep_last, barrier)
        checkpoints.clean_partial()
        total = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        if dist.is_main:
            resolved = config_to_dict(cfg)
            (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            print("resolved config:\n" + json.dumps(resolved, indent=2), flush=True)
            if cfg.engine.mode == "deepspeed":
                (out / "deepspeed_config.json").write_text(json.dumps(backend.ds_config, indent=2) + "\n")
                print("DeepSpeed config:\n" + json.dumps(backend.ds_config, indent=2), flush=True)
            print(f"engine: {backend.engine_facts()} compile={backend.compiled} device={dist.device} "
                  f"steps/epoch={steps_per_epoch} total steps={total} output dir={out}"
                  + (f" cpu threads={threads}" if dist.device.type == "cpu" else ""), flush=True)
        trainer_kw = dict(
            backend=backend, loader=loader, schedule=schedule, steps_per_epoch=steps_per_epoch,
            epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, global_batch_size=cfg.train.global_batch_size,
            nan_policy=cfg.train.nan_policy, max_skipped_steps=cfg.train.max_skipped_steps, checkpoints=checkpoints,
            checkpoint_every=cfg.checkpoint.every_steps, save_at_end=cfg.checkpoint.save_at_end,
            print_every=cfg.logging.print_every, world_size=dist.world_size, config=cfg,
            loss_curve=cfg.logging.loss_curve,
            on_step=_reconstruction_callback(cfg, backend, loader, out, dist.is_main))
        # the logger needs the start step, known only after resume: build the trainer, resume, then log
        trainer = Trainer(logger=MetricsLogger(out, False, total, 0, False, False), **trainer_kw)
        state = None
        if resume_path is not None:
            state = trainer.resume(resume_path, dist.rank)
            if dist.is_main:
                print(f"resumed from {resume_path} at step {state.step} (epoch {state.epoch})", flush=True)
        trainer.logger = MetricsLogger(out, dist.is_main, total, state.step if state else 0,
                                       cfg.logging.tensorboard, cfg.logging.progress_bar, cfg.name)
        state = trainer.fit(state)
        if dist.is_main:
            print(f"done: {state.step} steps, {state.skipped_steps} skipped; outputs in {out}", flush=True)
    finally:
        if loader is not None:
            loader.close()
        shutdown()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="SimMIM pretraining (DeepSpeed or plain PyTorch)")
    add_arguments(parser)
    return main(parser.parse_args(argv))
