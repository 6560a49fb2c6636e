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
from ..visualization import reconstruction_grid, save_png_atomically
from ..weights import simmim_param_groups

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
        return (cfg, out, resume_path, precision, _check_data(cfg))
    except BaseException:
        engine_run.release_output_dir(out)
        raise


def _check_data(cfg):
    """The dataset's checked file index (None for synthetic data); UserError for a dataset that cannot train."""
    paths = None
    if cfg.data.backend != "synthetic":
        world = int(os.environ.get("WORLD_SIZE", 1))
        accumulation = cfg.train.accumulation_steps(world)
        paths = list_images(cfg.data.path, cfg.data.layout)  # listed once: the loader reuses the list
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
    return callback


def main(args: argparse.Namespace) -> int:
    cfg, out, resume_path, precision, index = preflight(args)

    def build_model(ctx):
        model = SimMIM.from_config(cfg)
        return model, simmim_param_groups(model, cfg)

    def build_loader(ctx):
        return PretrainLoader(cfg, ctx.dist.rank, ctx.dist.world_size, ctx.dist.device, log_dir=out,
                              index=index)

    engine_run.run(cfg, out, resume_path, precision, build_model=build_model, build_loader=build_loader,
                   loss_label=LOSS_LABEL, on_step=_reconstructions)
    return 0
