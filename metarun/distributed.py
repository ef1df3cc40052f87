"""Data-parallel meta-training over torch.distributed, started by torchrun.

Why not DistributedDataParallel: DDP averages gradients from hooks on each parameter's
gradient accumulation, and expects one forward and one backward per step. Meta-learning breaks
both assumptions: inner loops call `torch.autograd.grad` (which DDP's hooks never see), run the
encoder functionally through `torch.func.functional_call` (bypassing the DDP wrapper's forward),
and call the encoder many times per step. So each process computes the meta-gradient of its
shard of the meta-batch with plain autograd, and the shards' gradients are summed explicitly
with one all-reduce per dtype after the backward passes: exactly the gradient of the whole
meta-batch, whatever the algorithm does inside.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from metarun.errors import MetarunError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's items: every world-th, starting at its rank (disjoint, complete)."""
        return list(items[self.rank :: self.world])

    def all_reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Sum gradients over processes, one flat all-reduce per dtype.

        A parameter no process used keeps `grad=None`, as in a single process (optimizers then
        skip it, weight decay included); one used only on some shards counts zero elsewhere.
        """
        if not self.active or not params:
            return
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                            device=params[0].device)  # fmt: skip
        dist.all_reduce(used, op=dist.ReduceOp.SUM)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p, anywhere in zip(params, used.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def sum(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        if not self.active:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist(), strict=True))

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """The main process's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_module(self, module: nn.Module) -> None:
        """Start every process from the main process's weights and buffers."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> tuple[Dist, int]:
    """Join the process group torchrun set up; returns (Dist, local rank)."""
    if not launched_by_torchrun():
        raise MetarunError(
            "hardware.distributed=true needs torchrun: "
            "torchrun --nproc_per_node N -m metarun hardware=ddp ..."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, world), local


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
