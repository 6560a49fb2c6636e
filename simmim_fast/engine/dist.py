"""Process-group setup for one process (python train.py), torchrun, or the deepspeed launcher."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["DistInfo", "dist_env", "init_distributed", "barrier", "shutdown", "set_cpu_threads", "RankAgreement"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> DistInfo:
    """Rank, world size and device from the launcher's environment (one process when there is none)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local, device)


def init_distributed(mode: str, backend: str) -> DistInfo:
    """Start the process group ('deepspeed' mode always has one, even for a single process)."""
    info = dist_env()
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if backend == "auto":
        backend = "nccl" if info.device.type == "cuda" else "gloo"
    if mode == "torch" and info.world_size == 1:
        return info
    if "MASTER_ADDR" not in os.environ:  # a plain single process: give it a private rendezvous
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if mode == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    elif not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return info


def set_cpu_threads(requested: int, info: DistInfo) -> int:
    """Intra-op threads for a CPU rank (engine.cpu_threads; 0 = automatic, see the config help)."""
    if info.device.type != "cpu":
        return torch.get_num_threads()
    if requested > 0:
        n = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        n = max(1, (os.cpu_count() or 1) // (2 * max(1, local_ranks)))
    torch.set_num_threads(n)
    return n


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


class RankAgreement:
    """The maximum of one small integer over all ranks, on the host: ``agree(value) -> max over ranks``.

    Used once per optimiser step for the stop flag (the signal number a rank received, 0 if none), so that
    every rank stops after the same step even when only some of them got the signal, and when a checkpoint
    save failed on some ranks. It runs on a gloo group of CPU tensors: no device synchronisation, whatever
    the training backend (NCCL all-reduces of a CUDA tensor would make the host wait for the GPU)."""

    def __init__(self, world_size: int):
        self.group = None
        if world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            self.group = torch_dist.new_group(backend="gloo")  # collective: every rank creates it, in order

    def __call__(self, value: int) -> int:
        if self.group is None:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return self(int(bool(flag))) > 0
