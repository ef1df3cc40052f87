"""What one training step computes, on this process: the contrastive batch or the meta-batch,
backpropagated; the trainer sums the processes' gradients and steps the optimiser."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metarun.algo import Algorithm
from metarun.config import TrainConfig
from metarun.distributed import Dist
from metarun.task import EpisodeSampler
from metarun.train.contrastive import ContrastiveStage


@dataclass
class Runtime:
    """How computations run: mixed precision (`autocast`), the process group, and whether
    this process shows progress bars."""

    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    dist: Dist = field(default_factory=Dist)
    progress: bool = False


def contrastive_losses(
    algo: Algorithm, stage: ContrastiveStage | None, runtime: Runtime
) -> dict[str, float]:
    """This process's contrastive batch, backpropagated at weight 1 / processes."""
    assert stage is not None
    world = runtime.dist.world
    with runtime.autocast():
        loss, metrics = stage.loss(algo.encoder)
    if torch.isfinite(loss):
        (loss / world).backward()
    metrics["loss"] = float(loss.detach())
    return {k: v / world for k, v in metrics.items()}


def episodic_losses(
    algo: Algorithm, sampler: EpisodeSampler, cfg: TrainConfig, runtime: Runtime
) -> dict[str, float]:
    """One meta-batch, in chunks of `episodes_per_backward`.

    Every process draws the same meta-batch (index draws are cheap) and backpropagates its
    own shard; summing the shards' gradients gives the whole meta-batch's gradient, so N
    processes take exactly the step one process would.
    """
    episodes = [sampler.sample() for _ in range(cfg.meta_batch_size)]
    mine = runtime.dist.shard(episodes)
    totals: dict[str, float] = {}
    chunk = max(1, cfg.episodes_per_backward)
    for start in range(0, len(mine), chunk):
        part = mine[start : start + chunk]
        with runtime.autocast():
            loss, metrics = algo.meta_loss(part)
        weight = len(part) / len(episodes)
        if torch.isfinite(loss):  # a NaN is reported below, once every process knows
            (loss * weight).backward()
        for key, value in {**metrics, "loss": float(loss.detach())}.items():
            totals[key] = totals.get(key, 0.0) + value * weight
    return totals
