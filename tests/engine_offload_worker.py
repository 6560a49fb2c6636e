"""Worker for tests/test_engine_offload.py, run as `deepspeed --num_gpus 2 ...` (two gloo ranks).

Variants (ZeRO stage + letters): o = optimizer offloaded to the CPU (DeepSpeed CPU Adam), p = optimizer
and parameters offloaded, c = activation checkpointing of every block. Each runs 4 steps on one fixed
global batch (each rank its shard, drop path on, the RNG seeded per step and rank), with a checkpoint
after step 2; then a fresh engine resumes from that checkpoint and runs steps 3-4 again. Writes the
global mean losses of both, the gathered fp32 weights at step 2, and <out>/result_rank0.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_zero_worker import fixed_batch  # noqa: E402
from helpers import tiny_swin_config  # noqa: E402

from simmim_fast import SimMIM, load_config  # noqa: E402
from simmim_fast.config import config_to_dict  # noqa: E402
from simmim_fast.engine.backends import DeepSpeedBackend  # noqa: E402
from simmim_fast.engine.checkpoint import CheckpointManager  # noqa: E402
from simmim_fast.engine.dist import barrier, init_distributed, shutdown  # noqa: E402
from simmim_fast.weights import simmim_param_groups  # noqa: E402


def gathered_params(module, stage):
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: p.detach().clone().float() for n, p in module.named_parameters()}
    return {n: p.detach().clone().float() for n, p in module.named_parameters()}


def make_backend(cfg, dist, seed):
    torch.manual_seed(seed)
    model = SimMIM.from_config(cfg).set_activation_checkpointing(cfg.engine.activation_checkpointing)
    return DeepSpeedBackend(model, simmim_param_groups(model, cfg), cfg, dist, cfg.engine.precision)


def steps(backend, shard, first, last, world, rank):
    losses = []
    for step in range(first, last + 1):
        torch.manual_seed(1000 + 10 * step + rank)  # drop path: the same draws whatever ran before
        loss = backend.train_step([shard], lr=1e-3).loss.clone()
        torch_dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=["1", "3o", "3oc", "3p", "2c"])
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    dist = init_distributed("deepspeed", "gloo")
    world, rank = dist.world_size, dist.rank
    out = Path(args.out)
    result = {"world_size": world, "variants": {}}
    base = config_to_dict(tiny_swin_config(drop_path_rate=0.2))
    global_batch = 8
    for variant in args.variants:
        t0 = time.time()
        stage = int(variant[0])
        data = dict(base)
        data["train"] = {"global_batch_size": global_batch, "micro_batch_size": global_batch // world,
                         "base_lr": 1e-3, "warmup_lr": 1e-3, "clip_grad": 0.1, "weight_decay": 0.05}
        offload = "optimizer_and_params" if "p" in variant else "optimizer" if "o" in variant else "none"
        data["engine"] = {"mode": "deepspeed", "zero_stage": stage, "precision": "fp32", "compile": False,
                          "offload": offload, "activation_checkpointing": "c" in variant}
        cfg = load_config(data)
        images, masks = fixed_batch(cfg, global_batch)
        mb = cfg.train.micro_batch_size
        shard = (images[rank * mb:(rank + 1) * mb], masks[rank * mb:(rank + 1) * mb])

        backend = make_backend(cfg, dist, seed=0)
        record = {"optimizer": type(backend.engine.basic_optimizer).__name__,
                  "offload": backend.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device"),
                  "offload_param": backend.ds_config["zero_optimization"].get("offload_param", {}).get("device")}
        losses = steps(backend, shard, 1, 2, world, rank)
        ckpts = CheckpointManager(out / f"v{variant}", rank, keep_last=2, barrier=barrier)
        ckpts.save(2, cfg, {"state": {"step": 2}, "steps_per_epoch": 1, "engine": backend.engine_facts()},
                   backend.write_state)
        full = gathered_params(backend.module, stage)
        if rank == 0:
            torch.save(full, out / f"v{variant}_params.pt")
        losses += steps(backend, shard, 3, 4, world, rank)
        barrier()
        del backend

        resumed = make_backend(cfg, dist, seed=123)  # other initial weights: all must come from the checkpoint
        resumed.read_state(out / f"v{variant}" / "checkpoints" / "step_00000002")
        record.update(losses=losses, resumed_losses=steps(resumed, shard, 3, 4, world, rank),
                      seconds=round(time.time() - t0, 2))
        result["variants"][variant] = record
        barrier()
        del resumed
    if rank == 0:
        (out / "result_rank0.json").write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
