"""This process's place among the processes `torchrun` / `accelerate launch` start (one per GPU).

Every process runs the whole pipeline on its own device; what differs from one process (its share of each
batch, the DDP/FSDP wrapper, who writes) is decided by the `Dist` it gets here. Only rank 0 logs and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qlora_lab.core.schema import DistributedConfig


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; a one-process run is `Dist()`."""

    strategy: str = "none"
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """All-reduce a few numbers (sum or max) across processes; the values themselves when alone."""
        if not self.active or self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()


def setup(cfg: DistributedConfig, device: str) -> Dist:
    """Join the process group the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    `distributed=ddp|fsdp` without a launcher runs as a group of one (useful to try the wrapped path on one GPU).
    """
    if cfg.name == "none":
        return Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = str(cfg.backend) if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(strategy=str(cfg.name), world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank,
                device=device)


def teardown(d: Dist) -> None:
    """Leave the group together: rank 0 still writes the summary and closes W&B after the others are done, and a
    process that tears its connections down while a peer still holds the group can make gloo abort that peer."""
    if d.active and dist.is_initialized():
        try:
            d.barrier()
        finally:
            dist.destroy_process_group()
