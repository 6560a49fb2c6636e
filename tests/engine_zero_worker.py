"""Worker for tests/test_engine_deepspeed.py, run as `python ...` (1 rank) or `deepspeed --num_gpus 2 ...`.

For each ZeRO stage: a few steps on one fixed global batch (each rank takes its shard) with gradient
clipping active (max norm 0.1), the global mean loss per step, a checkpoint, the full fp32 weights
(gathered) for comparison with load_model_state, and one step with a NaN loss that DeepSpeed must skip.
Writes <out>/result_rank0.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_swin_config  # noqa: E402

from simmim_fast import SimMIM, load_config  # noqa: E402
from simmim_fast.config import config_to_dict  # noqa: E402
from simmim_fast.engine.backends import DeepSpeedBackend  # noqa: E402
from simmim_fast.engine.checkpoint import CheckpointManager  # noqa: E402
from simmim_fast.engine.dist import barrier, init_distributed, shutdown  # noqa: E402
from simmim_fast.engine.optim import param_groups  # noqa: E402
from simmim_fast.masking import BatchMaskGenerator  # noqa: E402


def fixed_batch(cfg, global_batch):
    g = torch.Generator().manual_seed(1234)
    m = cfg.model
    images = torch.randn(global_batch, 3, m.img_size, m.img_size, generator=g)
    masks = BatchMaskGenerator(m.img_size, cfg.mask.mask_patch_size, m.patch_size, cfg.mask.mask_ratio)
    return images, masks(global_batch, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", nargs="+", default=["0", "1", "2", "3", "0b", "1b", "2b"],
                    help="ZeRO stages; a trailing b = bf16 weights (DeepSpeed bf16 mode) + bf16 autocast")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    dist = init_distributed("deepspeed", "gloo")
    world, rank = dist.world_size, dist.rank
    out = Path(args.out)
    result = {"world_size": world, "stages": {}}
    base = config_to_dict(tiny_swin_config())
    for variant in args.stages:
        stage, bf16 = int(variant[0]), variant.endswith("b")
        t0 = time.time()
        data = dict(base)
        data["train"] = {"global_batch_size": args.global_batch, "micro_batch_size": args.global_batch // world,
                         "base_lr": 1e-3, "warmup_lr": 1e-3, "clip_grad": 0.1, "weight_decay": 0.05,
                         "layer_decay": 0.9}
        data["engine"] = {"mode": "deepspeed", "zero_stage": stage, "precision": "bf16" if bf16 else "fp32",
                          "bf16_weights": bf16, "compile": False}
        cfg = load_config(data)
        torch.manual_seed(0)
        model = SimMIM.from_config(cfg)
        groups = param_groups(model, cfg.train.weight_decay, layer_decay=cfg.train.layer_decay, model_cfg=cfg.model)
        expected_lrs = sorted((g["group_name"], g["lr_scale"]) for g in groups)
        backend = DeepSpeedBackend(model, groups, cfg, dist, cfg.engine.precision)
        backend.set_lr(1.0)  # each group of the optimiser that steps must get lr x its layer-decay scale
        got_lrs = sorted((g["group_name"], g["lr"]) for g in backend.engine.basic_optimizer.param_groups)
        images, masks = fixed_batch(cfg, args.global_batch)
        mb = cfg.train.micro_batch_size
        shard = (images[rank * mb:(rank + 1) * mb], masks[rank * mb:(rank + 1) * mb])
        losses, norms = [], []
        for _ in range(args.steps):
            r = backend.train_step([shard], lr=1e-3)
            loss = r.loss.clone()
            torch_dist.all_reduce(loss)
            losses.append(loss.item() / world)
            norms.append(float(r.grad_norm) if r.grad_norm is not None else None)
        # checkpoint + the gathered fp32 weights it must consolidate to
        ckpts = CheckpointManager(out / f"zero{variant}", rank, keep_last=2, barrier=barrier)
        ckpts.save(args.steps, cfg, {"state": {"step": args.steps}, "steps_per_epoch": 1,
                                     "engine": backend.engine_facts()}, backend.write_state)
        module = backend.module
        if stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                full = {n: p.detach().clone().float() for n, p in module.named_parameters()}
        else:
            full = {n: p.detach().clone().float() for n, p in module.named_parameters()}
        if rank == 0:
            torch.save(full, out / f"zero{variant}_params.pt")
        record = {"losses": losses, "grad_norms": norms, "seconds": round(time.time() - t0, 2),
                  "group_lrs_ok": got_lrs == expected_lrs and len({v for _, v in got_lrs}) > 2}
        result["stages"][variant] = record
        if variant == "0":  # ZeRO-0 (fp32) does not skip non-finite steps (train.py refuses nan_policy 'skip' there)
            barrier()
            del backend
            continue
        # a NaN loss: DeepSpeed's ZeRO optimiser must skip the update
        backend.loss_fn = lambda m, b: m(*b) * float("nan")
        nan_result = backend.train_step([shard], lr=1e-3)
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                after = {n: p.detach().clone().float() for n, p in module.named_parameters()}
        else:
            after = {n: p.detach().clone().float() for n, p in module.named_parameters()}
        unchanged = all(torch.equal(full[n], after[n]) for n in full)
        record.update(nan_step_applied=nan_result.applied, params_unchanged_after_nan=unchanged)
        barrier()
        del backend
    if rank == 0:
        (out / "result_rank0.json").write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
