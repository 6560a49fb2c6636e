"""``simmim-fast finetune``: full fine-tuning of a pretrained encoder, through the training engine.

    simmim-fast finetune PRETRAINED --config configs/finetune_swin_b_224.json --output-dir runs/ft

The classifier is the timm model of the fine-tuning config's ``model`` section (e.g. Swin-B at
224 px, window 7, drop path 0.1) with ``finetune.num_classes`` outputs, initialised from the
pretrained encoder as ``simmim-fast export`` converts it (tables interpolated, head fresh).
As the SimMIM paper fine-tunes: layer-wise lr decay (``train.layer_decay``: Swin-B 100ep 0.9, 800ep 0.8, Swin-L
0.7, ViT-B 0.65) through the engine's param groups, AdamW, warmup + cosine, label smoothing
and mixup / cutmix (timm), RandAugment and random erasing for ImageFolder data (timm). The model
is evaluated (top-1 on the val split) at the end of every epoch; the best one is kept as
``<output-dir>/best/model.safetensors`` (plain timm classifier weights) with ``best/metrics.json``,
every evaluation is appended to ``<output-dir>/eval.jsonl``. Regular checkpoints and resume are
the engine's (``--resume auto``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..cli import add_job_arguments
from ..config import Config, load_config
from ..engine import run as engine_run
from ..engine.optim import param_groups
from ..tools.export import normalisation
from ..weights import build_timm_model, load_source
from ..errors import UserError

__all__ = ["FinetuneModel", "adopt_normalisation", "build_classifier", "FinetuneLoader", "build_mixup", "evaluate_top1", "BestKeeper",
           "finetune_datasets", "apply_activation_checkpointing", "add_arguments", "main", "run"]


class FinetuneModel(nn.Module):
    """A timm classifier (``.encoder``) whose forward returns the training loss for a batch.

    With mixup/cutmix the targets are soft (B, classes) rows, made by timm's Mixup with label
    smoothing folded in; without, hard labels and label-smoothed cross-entropy.
    """

    def __init__(self, net: nn.Module, label_smoothing: float, soft_targets: bool):
        super().__init__()
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        self.encoder = net
        self.soft_targets = soft_targets
        if soft_targets:
            self.criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(images), targets)

    def no_weight_decay(self):
        names = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in names}


def build_classifier(cfg: Config, num_classes: int, pretrained: Optional[Tuple[Config, Dict[str, torch.Tensor]]]):
    """(timm classifier, (model name, kwargs)) for the fine-tuning config, with pretrained encoder weights.

    ``pretrained`` is (pretraining config, SimMIM state dict) or None (random init, e.g. a baseline).
    """
    from ..tools.export import convert_to_timm, encoder_state_dict, timm_target
    name, kwargs = timm_target(cfg)  # the fine-tuning model: its image size and window
    kwargs = dict(kwargs, drop_path_rate=cfg.model.drop_path_rate)
    if pretrained is not None:
        pre_cfg, state = pretrained
        if pre_cfg.model.encoder != cfg.model.encoder:
            raise UserError(f"pretrained encoder is {pre_cfg.model.encoder!r} but the fine-tuning config's "
                             f"model.encoder is {cfg.model.encoder!r}")
        weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs, num_classes))
    net = build_timm_model(name, kwargs, num_classes, device="cpu")
    if pretrained is not None:
        missing, unexpected = net.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:  # convert_to_timm checks this already; a second look costs nothing
            raise UserError(f"pretrained weights do not fit {name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return net, (name, kwargs)


def adopt_normalisation(cfg: Config, pre_cfg: Config) -> None:
    """Fine-tune on the bands and value space the encoder was pretrained on: model.in_chans,
    data.mean, data.std and data.value_range come from the pretraining checkpoint's config."""
    d, p = cfg.data, pre_cfg.data
    changed = [k for k, a, b in (("model.in_chans", cfg.model.in_chans, pre_cfg.model.in_chans),
                                 ("data.mean", list(d.mean), list(p.mean)), ("data.std", list(d.std), list(p.std)),
                                 ("data.value_range", d.value_range, p.value_range)) if a != b]
    if changed:
        print(f"finetune: {', '.join(changed)} taken from the pretraining checkpoint: in_chans "
              f"{pre_cfg.model.in_chans}, mean {list(p.mean)}, std {list(p.std)}, value_range {p.value_range}",
              flush=True)
    cfg.model.in_chans = pre_cfg.model.in_chans
    d.mean, d.std, d.value_range = list(p.mean), list(p.std), p.value_range


def apply_activation_checkpointing(net: nn.Module, cfg: Config) -> None:
    """engine.activation_checkpointing for a plain timm classifier: timm's own switch (non-reentrant torch
    checkpoint of every block), so only true / 1 or false."""
    ac = cfg.engine.activation_checkpointing
    if ac is False:
        return
    if ac is not True and ac != 1:
        raise UserError(f"config key 'engine.activation_checkpointing' = {ac}: fine-tuning checkpoints every "
                        f"block (true) or none (false), through timm's set_grad_checkpointing")
    net.set_grad_checkpointing(True)


def build_mixup(cfg: Config, num_classes: int):
    """timm Mixup for the finetune section, or None when mixup and cutmix are both off."""
    ft = cfg.finetune
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mixup_prob, switch_prob=ft.mixup_switch_prob,
                 mode="batch", label_smoothing=ft.label_smoothing, num_classes=num_classes)


def finetune_datasets(cfg: Config):
    """(train, val) datasets: training augmentation (RandAugment, random erasing) for ImageFolder data."""
    from ..tools.eval_data import FASHION_MNIST, eval_datasets
    ft, m = cfg.finetune, cfg.model
    if ft.data is None:
        raise UserError("config key 'finetune.data' is null: set it to 'fashion-mnist' or an ImageFolder root "
                         "with train/ and val/ (e.g. --set finetune.data=/data/imagenet)")
    train, val = eval_datasets(ft.data, m.img_size, cfg.data.mean, cfg.data.std, ft.train_limit, ft.val_limit,
                               cfg.train.seed, cfg.data.value_range)
    bands = m.in_chans != 3 or cfg.data.value_range is not None
    if not ft.data.startswith(FASHION_MNIST) and bands:
        # timm's RandAugment and random erasing work on 8-bit RGB images: for other bands, random
        # resized crops and horizontal flips on all bands alike (of the already normalised tensor)
        from torchvision import transforms as T
        base = train.dataset if isinstance(train, torch.utils.data.Subset) else train
        norm = T.Normalize(list(cfg.data.mean), list(cfg.data.std))
        base.transform = T.Compose([T.RandomResizedCrop(m.img_size, antialias=True), T.RandomHorizontalFlip(), norm])
    elif not ft.data.startswith(FASHION_MNIST):
        from timm.data import create_transform
        base = train.dataset if isinstance(train, torch.utils.data.Subset) else train
        base.transform = create_transform(m.img_size, is_training=True, auto_augment=ft.auto_augment,
                                          re_prob=ft.reprob, re_mode="pixel", re_count=1, interpolation="bicubic",
                                          mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    return train, val


class FinetuneLoader:
    """The engine's loader interface over a labelled dataset: ``epoch(epoch, start_batch)`` yields
    (images, targets) on the device; order is a function of (seed, epoch, rank, world size), and
    mixup draws are seeded per (seed, epoch, step, rank), so a resumed epoch sees the same batches."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world_size: int, device, num_workers: int,
                 mixup=None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.num_workers, self.mixup = num_workers, mixup
        self.micro_batches_per_epoch = (len(dataset) // world_size) // batch_size
        if self.micro_batches_per_epoch == 0:
            raise UserError(f"fine-tuning data has {len(dataset)} images, fewer than one batch per rank "
                             f"(train.micro_batch_size {batch_size} x {world_size} ranks)")
        if mixup is not None and batch_size % 2:
            raise UserError(f"mixup/cutmix need an even train.micro_batch_size, got {batch_size}")

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        from ..data import epoch_order
        order = epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world_size, self.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order[start_batch * self.batch_size:],
                            num_workers=self.num_workers, drop_last=True, pin_memory=self.device.type == "cuda")
        for step, (images, labels) in enumerate(loader, start=start_batch):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.mixup is not None:
                # timm's Mixup draws from numpy's global generator: seed it per step, then put it back.
                saved = np.random.get_state()
                np.random.seed(np.random.default_rng([self.seed, epoch, step, self.rank, 0x3117]).integers(2 ** 31))
                try:
                    images, labels = self.mixup(images, labels)
                finally:
                    np.random.set_state(saved)
            yield images, labels

    def close(self) -> None:
        pass


@torch.no_grad()
def evaluate_top1(net: nn.Module, dataset, batch_size: int, device, rank: int = 0, world_size: int = 1,
                  num_workers: int = 0) -> Tuple[float, int]:
    """(top-1 percent, images) of a classifier over a dataset; each rank takes every world_size-th
    image and the counts are summed over ranks."""
    from torch.utils.data import DataLoader, Subset
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    was_training = net.training
    net.eval()
    dtype = next(net.parameters()).dtype
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for images, labels in DataLoader(shard, batch_size=batch_size, num_workers=num_workers):
            logits = net(images.to(device, dtype))
            counts[0] += (logits.argmax(1).cpu() == labels).sum().item()
            counts[1] += labels.numel()
    finally:
        net.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    return 100.0 * counts[0].item() / max(1.0, counts[1].item()), int(counts[1].item())


class BestKeeper:
    """Keeps ``<output_dir>/best/``: the best classifier so far (plain timm state dict, float32) and
    its metrics; survives a resume (the best top-1 is read back)."""

    def __init__(self, output_dir: Path, model_name: str, model_kwargs: dict, num_classes: int,
                 normalisation: Optional[dict] = None):
        self.dir = Path(output_dir) / "best"
        self.info = {"model_name": model_name, "model_kwargs": model_kwargs, "num_classes": num_classes}
        if normalisation is not None:  # what the classifier's inputs must be normalised with
            self.info["normalisation"] = normalisation
        metrics = self.dir / "metrics.json"
        self.best = json.loads(metrics.read_text())["top1"] if metrics.is_file() else -1.0

    def update(self, top1: float, step: int, epoch: int, state_fn) -> bool:
        """Write the model (``state_fn()`` -> state dict) if ``top1`` beats the best; True if it did."""
        if top1 <= self.best:
            return False
        from safetensors.torch import save_file
        tmp = self.dir.with_name(".best.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state_fn().items()}
        meta = {"format": "pt"}
        if "normalisation" in self.info:
            meta["normalisation"] = json.dumps(self.info["normalisation"])
        save_file(state, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "metrics.json").write_text(json.dumps(dict(self.info, top1=top1, step=step, epoch=epoch), indent=2))
        old = self.dir.with_name(".best.old")
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        if old.exists():
            import shutil
            shutil.rmtree(old)
        self.best = top1
        return True


# --------------------------------------------------------------------------------------------
# CLI

LOSS_LABEL = "cross-entropy loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", help="pretraining output dir / checkpoint dir / SimMIM state-dict file, or "
                                           "'none' for random init (a baseline)")
    add_job_arguments(parser, config_help="fine-tuning config JSON (model, train, engine, finetune)")
    parser.add_argument("--pretrained-config", help="config of the pretrained weights when they carry none")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default data.num_workers)")


def run(args: argparse.Namespace) -> Dict[str, float]:
    """Fine-tune; returns {'best_top1', 'last_top1'}."""
    cfg = load_config(args.config, args.overrides)
    pretrained = None if args.pretrained == "none" else load_source(args.pretrained, args.pretrained_config)
    if pretrained is not None:
        adopt_normalisation(cfg, pretrained[0])  # before the resume check compares the model section
    out, resume_path, precision = engine_run.prepare(cfg, args.output_dir, args.resume)
    train_set, val_set = finetune_datasets(cfg)
    base = getattr(train_set, "dataset", train_set)
    num_classes = cfg.finetune.num_classes or len(getattr(base, "classes", []))
    if not num_classes:
        raise UserError("cannot tell the number of classes of finetune.data: set finetune.num_classes")
    mixup = build_mixup(cfg, num_classes)
    target = {}

    def build_model(ctx):
        net, (name, kwargs) = build_classifier(cfg, num_classes, pretrained)
        target.update(name=name, kwargs=kwargs)
        apply_activation_checkpointing(net, cfg)
        model = FinetuneModel(net, cfg.finetune.label_smoothing, soft_targets=mixup is not None)
        return model, param_groups(model, cfg.train.weight_decay, layer_decay=cfg.train.layer_decay,
                                   model_cfg=cfg.model)

    def build_loader(ctx):
        workers = cfg.data.num_workers if args.workers is None else args.workers
        return FinetuneLoader(train_set, cfg.train.micro_batch_size, cfg.train.seed, ctx.dist.rank,
                              ctx.dist.world_size, ctx.dist.device, workers, mixup)

    keeper: Optional[BestKeeper] = None
    results = {"best_top1": -1.0, "last_top1": float("nan")}

    def describe(ctx) -> str:
        return (f"finetune {target['name']} {target['kwargs']} classes={num_classes} train={len(train_set)} "
                f"val={len(val_set)} layer_decay={cfg.train.layer_decay}")

    def on_step(ctx):
        nonlocal keeper
        dist = ctx.dist
        keeper = BestKeeper(out, target["name"], {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in target["kwargs"].items()}, num_classes,
                            normalisation(cfg))
        results["best_top1"] = keeper.best

        def evaluate(state) -> Optional[Dict[str, float]]:
            if state.step_in_epoch != ctx.steps_per_epoch and state.step != ctx.total_steps:
                return None
            module = ctx.backend.module.encoder
            # ZeRO-3 fetches and releases parameters around each submodule's forward by itself; only
            # reading the full weights for best/ needs them gathered (all ranks enter, rank 0 writes).
            top1, n = evaluate_top1(module, val_set, cfg.finetune.eval_batch_size, dist.device, dist.rank,
                                    dist.world_size)
            improved = False
            with engine_run.gathered(module, cfg):
                if dist.is_main:
                    improved = keeper.update(top1, state.step, state.epoch, module.state_dict)
            results["last_top1"], results["best_top1"] = top1, max(results["best_top1"], top1)
            if dist.is_main:
                with open(out / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"step": state.step, "epoch": state.epoch, "top1": top1, "images": n,
                                        "best": keeper.best}) + "\n")
                print(f"eval epoch {state.epoch} step {state.step}: top-1 {top1:.2f}% on {n} images"
                      f"{' (best so far, saved to ' + str(keeper.dir) + ')' if improved else ''}", flush=True)
            # also in metrics.jsonl, TensorBoard and the trackers, with the step's record (every rank returns)
            return {"eval/top1": top1}
        return evaluate

    engine_run.run(cfg, out, resume_path, precision, build_model=build_model, build_loader=build_loader,
                   loss_label=LOSS_LABEL, on_step=on_step, describe=describe)
    if int(os.environ.get("RANK", 0)) == 0 and keeper is not None:
        print(f"done: best top-1 {keeper.best:.2f}% ({keeper.dir}), last {results['last_top1']:.2f}%", flush=True)
    return results


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0
