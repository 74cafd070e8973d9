"""The distributed side of a run: the process group, the DDP wrapper and the collectives. With one process
every method is a local call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """This process's membership of the run's process group (nccl on CUDA, gloo on CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # every rank is done with its collectives before any tears the group down: a gloo peer that is
        # still reading when the other side closes its connections can abort
        dist.barrier()
    finally:
        dist.destroy_process_group()


class Processes:
    """This process's rank among ``world_size``, the DDP wrapper and the collectives of a session."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def launcher(self) -> str:
        """The command that starts this many processes again (for the resume hint)."""
        if self.world_size == 1:
            return "rnndeploy"
        return f"torchrun --nproc_per_node {self.world_size} -m rnndeploy"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as the training step calls it: DistributedDataParallel with several processes."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def gather(self, mine: Any) -> list[Any]:
        """Every process's ``mine`` (a picklable object), in rank order."""
        if self.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def replica_difference(self, model: torch.nn.Module) -> float | None:
        """The largest absolute difference between the replicas' parameters (``None``: one process)."""
        if self.world_size == 1:
            return None
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        return max((g - gathered[0]).abs().max().item() for g in gathered)
