"""torch.distributed set-up for torchrun (NCCL on CUDA, gloo on CPU) and small collective helpers."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; single process when they are absent.

    The process-group timeout (`run.dist_timeout_s`) bounds how long healthy ranks wait in a
    collective for a failed one.
    """
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(device=device)
    timeout = dt.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(values: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """`values` reduced element-wise over ranks (`sum` or `max`), on the device: no host read."""
    if not info.enabled:
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return total


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if every rank's flag is True."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Waits for every rank (the main one writes reports last), then tears the group down.

    Destroying the group while a peer is still working can abort the process at exit
    ("terminate called without an active exception" from gloo's threads).
    """
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_gather_values(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The 1-D tensors of every rank, concatenated (lengths may differ)."""
    if not info.enabled:
        return values
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, values.detach().cpu())
    return torch.cat(gathered).to(values.device)


def all_gather_objects(obj: object, info: DistInfo) -> list:
    """`obj` of every rank (picklable), in rank order."""
    if not info.enabled:
        return [obj]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class RankCollectives:
    """`weighting.Collectives` over the run's ranks. `gather` pads every rank's rows to
    `capacity` (the most rows a rank can hand in: its step's token positions), so that
    `all_gather_into_tensor` moves equal, host-known sizes and nothing waits for the device."""

    def __init__(self, info: DistInfo, capacity: int):
        self.info, self.capacity = info, capacity

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_tensor(values, self.info)

    def gather(self, rows: torch.Tensor, fill: float) -> torch.Tensor:
        if not self.info.enabled:
            return rows
        if rows.shape[0] > self.capacity:
            raise ValueError(f"{rows.shape[0]} rows to gather, capacity {self.capacity}")
        padded = rows.new_full((self.capacity, *rows.shape[1:]), fill)
        padded[: rows.shape[0]] = rows
        out = rows.new_empty((self.info.world_size * self.capacity, *rows.shape[1:]))
        dist.all_gather_into_tensor(out, padded)
        return out
