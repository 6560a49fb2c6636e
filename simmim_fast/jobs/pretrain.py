"""SimMIM pretraining: the SimMIM model and the pretraining loader, run by the engine (train.py).

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

from ..cli import add_job_arguments
from ..config import load_config
from ..data import PretrainLoader, list_images
from ..data.loader import check_usable, load_index
from ..engine import run as engine_run
from ..errors import UserError
from ..models import SimMIM
from ..tools.export import normalisation, read_normalisation
from ..tools.plan import preflight_memory
from ..visualization import reconstruction_grid, save_png_atomically
from ..weights import simmim_param_groups
from .online_probe import check_probe_config, online_probe_callback

__all__ = ["add_arguments", "main", "preflight"]

LOSS_LABEL = "masked L1 loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--data-path", default=None, help="dataset path; same as --set data.path=PATH")


def preflight(args: argparse.Namespace):
    """Everything that can be checked without starting the engine: (cfg, output dir, resume path,
    precision, the dataset's checked file index or None for synthetic data)."""
    overrides = list(args.overrides)
    if args.data_path is not None:
        overrides.append(f"data.path={json.dumps(args.data_path)}")
    cfg = load_config(args.config, overrides=overrides)
    out, resume_path, precision = engine_run.prepare(cfg, args.output_dir, args.resume)
    try:
        check_probe_config(cfg)
        # On CUDA: refuse a config that cannot fit on these GPUs before anything is allocated (the memory
        # planner's estimate, measured on the meta device); nothing on the CPU.
        preflight_memory(cfg, args.config)
        index = _check_data(cfg)
        _compare_normalisation(cfg)
        return cfg, out, resume_path, precision, index
    except BaseException:
        engine_run.release_output_dir(out)
        raise


def _check_data(cfg):
    """The dataset's checked file index (None for synthetic data); UserError for a dataset that cannot train."""
    paths = None
    if cfg.data.backend != "synthetic":
        world = int(os.environ.get("WORLD_SIZE", 1))
        accumulation = cfg.train.accumulation_steps(world)
        paths = list_images(cfg.data.path, cfg.data.layout, cfg.data.cache_dir)  # listed once: the loader reuses the list
        micro_batches = (len(paths) // world) // cfg.train.micro_batch_size
        if micro_batches < accumulation:
            raise UserError(
                f"dataset {cfg.data.path or '(sample photos)'} has {len(paths)} images: {micro_batches} micro-batches "
                f"per rank per epoch, fewer than one optimiser step needs ({accumulation} accumulation steps x "
                f"train.micro_batch_size {cfg.train.micro_batch_size} x {world} ranks); lower "
                f"train.global_batch_size / train.micro_batch_size or add images")
        # The file check (cached per dataset) before any engine starts: an unusable dataset is one error line.
        index = load_index(cfg, paths=paths)
        check_usable(index, cfg)
        return index
    return None


def _compare_normalisation(cfg) -> None:
    """model.init_weights that record their normalisation (our exports and checkpoints): say when this run
    normalises differently, since the weights learned features of inputs normalised their way."""
    path = cfg.model.init_weights
    if not path or not os.path.exists(path):
        return  # a missing file is reported by the model build, with the key
    try:
        recorded = read_normalisation(path)
    except Exception:  # noqa: BLE001 - unreadable metadata: the weights loader gives the real error
        return
    if recorded is None:
        return
    now = normalisation(cfg)
    differ = [k for k in ("in_chans", "mean", "std", "value_range") if recorded.get(k) != now[k]]
    if differ and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: model.init_weights {path} was trained with "
              + ", ".join(f"{k} {recorded.get(k)}" for k in differ) + "; this run uses "
              + ", ".join(f"{k} {now[k]}" for k in differ), flush=True)


def _reconstructions(ctx: engine_run.RunContext):
    """logging.visualize_every: a reconstruction grid PNG of a fixed batch every N steps."""
    cfg, out, dist = ctx.cfg, ctx.out, ctx.dist
    every = cfg.logging.visualize_every
    if not every:
        return None
    images, mask = next(iter(ctx.loader.epoch(0)))
    images, mask = images[:8], mask[:8]
    (out / "reconstructions").mkdir(exist_ok=True)

    def callback(state) -> None:
        if state.step % every:
            return
        with engine_run.gathered(ctx.backend.module, cfg):  # every rank takes part in a ZeRO-3 gather
            grid = reconstruction_grid(ctx.backend.module, images, mask, cfg.data.mean, cfg.data.std)
        if dist.is_main:
            save_png_atomically(grid, out / "reconstructions" / f"step_{state.step:08d}.png")
            ctx.logger.log_image("reconstructions", grid, state.step)  # TensorBoard and the trackers
    return callback


def _on_step(ctx: engine_run.RunContext):
    """The job's per-step hooks: reconstruction grids, then the online probe; their scalars merged."""
    hooks = [h for h in (_reconstructions(ctx), online_probe_callback(ctx)) if h is not None]
    if not hooks:
        return None

    def callback(state):
        scalars = None
        for hook in hooks:
            out = hook(state)
            if out is not None:
                scalars = {**(scalars or {}), **out}
        return scalars
    return callback


def main(args: argparse.Namespace) -> int:
    cfg, out, resume_path, precision, index = preflight(args)

    def build_model(ctx):
        model = SimMIM.from_config(cfg).set_activation_checkpointing(cfg.engine.activation_checkpointing)
        return model, simmim_param_groups(model, cfg)

    def build_loader(ctx):
        return PretrainLoader(cfg, ctx.dist.rank, ctx.dist.world_size, ctx.dist.device, log_dir=out,
                              index=index)

    engine_run.run(cfg, out, resume_path, precision, build_model=build_model, build_loader=build_loader,
                   loss_label=LOSS_LABEL, on_step=_on_step)
    return 0
