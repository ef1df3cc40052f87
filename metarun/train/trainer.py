"""The outer loop: meta-batches, mixed precision, clipping, validation, checkpoints, resume.

Algorithms own only their inner loop (`meta_loss`, `adapt`); everything else is here. What a
step computes is in batches.py; what a run has done so far is one `Progress`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metarun.algo import Algorithm
from metarun.config import TrainConfig
from metarun.distributed import Dist
from metarun.errors import MetarunError
from metarun.interrupts import STOP
from metarun.logger import Logger
from metarun.rundir.files import save_checkpoint
from metarun.task import Episode, EpisodeSampler
from metarun.train.batches import Runtime, contrastive_losses, episodic_losses
from metarun.train.contrastive import ContrastiveStage
from metarun.train.evaluate import EvalResult, evaluate
from metarun.train.progress import Progress, rng_state, set_rng_state

log = logging.getLogger("metarun")


@dataclass
class FitResult:
    steps_done: int
    best_step: int | None
    best_val_acc: float | None
    train_seconds: float
    episodes_per_second: float | None


@dataclass
class Episodes:
    """What training reads: the training sampler, the fixed validation episodes, and the
    optional contrastive stage (train.contrastive_steps) that comes first."""

    sampler: EpisodeSampler
    val: list[Episode]
    contrastive: ContrastiveStage | None = None


@dataclass
class Checkpoints:
    """Where the trainer saves: the best weights (`best`, checkpoint.pt) and the resumable
    state (`state`, last.pt; None: not saved), each with `meta` (config, versions, data)."""

    best: Path
    state: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def build_optimizer(groups: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`groups`: tensors or torch parameter groups (a group's own "lr" overrides train.lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One fused kernel over all tensors instead of a loop of small ops per tensor.
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class Trainer:
    def __init__(
        self, algo: Algorithm, cfg: TrainConfig, episodes: Episodes, logger: Logger,
        checkpoints: Checkpoints, runtime: Runtime | None = None,
    ) -> None:  # fmt: skip
        self.algo, self.cfg, self.episodes, self.logger = algo, cfg, episodes, logger
        self.checkpoints, self.runtime = checkpoints, runtime or Runtime()
        self.dist: Dist = self.runtime.dist
        if self.dist.active and cfg.meta_batch_size < self.dist.world:
            raise MetarunError(
                f"train.meta_batch_size={cfg.meta_batch_size} is smaller than the "
                f"{self.dist.world} processes; each needs at least one episode per step"
            )
        groups = algo.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        # Steps 1..pre_steps train the encoder contrastively, the `cfg.steps` episodic steps
        # follow; validation, checkpoints and resume span both.
        stage = episodes.contrastive
        self.pre_steps = stage.steps if stage is not None else 0
        self.total = self.pre_steps + cfg.steps
        if self.pre_steps and not any(p.requires_grad for p in algo.encoder.parameters()):
            raise MetarunError(
                f"train.contrastive_steps={self.pre_steps} trains the encoder, but this algorithm "
                "freezes it (algo=frozen, zeroshot or backbone.trainable=none): set "
                "train.contrastive_steps=0 or pick an algorithm that trains the encoder"
            )
        # Frozen baselines have nothing to optimise: no optimizer, `fit` only evaluates.
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if self.params:
            warmup = max(cfg.warmup_steps, 1)
            self.optimizer = build_optimizer(groups, cfg)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
            )
        self.progress = Progress()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes; frozen weights come back from the backbone config."""
        return {n: p.detach().to("cpu", copy=True)
                for n, p in self.algo.named_parameters() if p.requires_grad}  # fmt: skip

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        unknown = self.algo.load_state_dict(state, strict=False).unexpected_keys
        if unknown:
            raise MetarunError(f"checkpoint keys unknown to this model: {unknown[:5]}")

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step: contrastive during the first `pre_steps`, episodic after."""
        assert self.optimizer is not None and self.scheduler is not None, "nothing to train"
        self.optimizer.zero_grad(set_to_none=True)
        if 0 < step <= self.pre_steps:  # steps count from 1; benchmarks pass 0
            totals = contrastive_losses(self.algo, self.episodes.contrastive, self.runtime)
        else:
            totals = episodic_losses(self.algo, self.episodes.sampler, self.cfg, self.runtime)
        totals = self.dist.sum(totals, self.params[0].device)
        if not math.isfinite(totals["loss"]):
            raise MetarunError(
                f"train/loss is {totals['loss']} at step {step}: lower train.lr (now "
                f"{self.cfg.lr}) or set train.grad_clip; metrics.jsonl and the checkpoints so "
                "far are kept"
            )
        self.dist.all_reduce_grads(self.params)
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return {f"train/{k}": v for k, v in totals.items()}

    def validate(self, step: int) -> EvalResult:
        """Validation episodes; an improvement becomes the best state (and checkpoint.pt)."""
        done = self.progress
        result = evaluate(self.algo, self.episodes.val, self.runtime.autocast, self.dist)
        improved = done.best_acc is None or result.acc > done.best_acc
        if improved:
            done.best_acc, done.best_step = result.acc, step
            done.best_state = self.trainable_state()
            if self.cfg.save_checkpoint and self.dist.main:
                payload = {"trainable_state": done.best_state, "step": step,
                           "val_acc": result.acc, **self.checkpoints.meta}  # fmt: skip
                save_checkpoint(self.checkpoints.best, payload)
                done.saved_checkpoint = True
        done.waited = 0 if improved else done.waited + 1
        self.logger.log(result.metrics("val") | {"val/best_acc": done.best_acc}, step)
        return result

    def state(self) -> dict[str, Any]:
        """Everything `resume` needs to continue exactly where this step ended."""
        assert self.optimizer is not None and self.scheduler is not None
        stage = self.episodes.contrastive
        return {
            **self.progress.as_state(), "trainable_state": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": self.dist.gather(rng_state()),  # per process: dropout draws differ by shard
            "sampler": self.episodes.sampler.state_dict(),
            "contrastive_sampler": stage.sampler.state_dict() if stage else None,
            "wandb_run_id": self.logger.wandb_id, **self.checkpoints.meta,
        }  # fmt: skip

    def save_state(self) -> None:
        state = self.state()  # every process takes part in gathering the RNG states
        if self.checkpoints.state is not None and self.dist.main:
            save_checkpoint(self.checkpoints.state, state)

    def resume(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        self.load_trainable(state["trainable_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        self.episodes.sampler.load_state_dict(state["sampler"])
        self.progress = Progress.from_state(state)
        stage = self.episodes.contrastive
        if stage is not None and state.get("contrastive_sampler"):
            stage.sampler.load_state_dict(state["contrastive_sampler"])
        log.info("resumed at step %d of %d", self.progress.step, self.total)

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (all must stop at the same step)."""
        return self.dist.sum({"stop": float(STOP.requested)}, self.params[0].device)["stop"] > 0

    def fit(self) -> FitResult:
        done = self.progress
        if self.total == 0 or not self.params:
            if self.total and not self.params:
                log.info("nothing to meta-train (frozen encoder, no algorithm parameters): "
                         "evaluating only")  # fmt: skip
            return FitResult(0, None, None, 0.0, None)
        if self.cfg.val_at_start and done.step == 0 and done.best_acc is None:
            self.validate(0)  # the starting weights compete with every trained step
        self.algo.train()
        shown = self.runtime.progress and self.dist.main
        bar = tqdm(range(done.step + 1, self.total + 1), desc="meta-train", initial=done.step,
                   total=self.total, disable=not shown)  # fmt: skip
        with STOP.deferred():
            for step in bar if not done.stopped else ():
                self.train_step(step, bar)
                if done.stopped:
                    break
        if done.best_state is not None:
            self.load_trainable(done.best_state)
        episodic = max(0, done.step - self.pre_steps) * self.cfg.meta_batch_size
        seconds = done.episodic_seconds
        rate = episodic / seconds if seconds > 0 else math.nan
        return FitResult(done.step, done.best_step, done.best_acc, done.seconds, rate)

    def train_step(self, step: int, bar: tqdm) -> None:
        """One step, then what follows it: logging, validation (and an early stop), saving the
        state, and stopping here when a signal asked for it."""
        done, cfg = self.progress, self.cfg
        start = time.perf_counter()
        metrics = self.step(step)
        elapsed = time.perf_counter() - start
        done.seconds += elapsed
        done.episodic_seconds += elapsed if step > self.pre_steps else 0.0
        done.step = step
        self.logger.log(metrics, step)
        shown = ("train/loss", "train/acc", "train/contrastive_acc")
        bar.set_postfix(**{k.removeprefix("train/"): f"{metrics[k]:.3f}" for k in shown
                           if k in metrics})  # fmt: skip
        if step % cfg.val_interval == 0 or step == self.total:
            self.validate(step)
            bar.unpause()  # the bar's rate counts training steps, not validation
            bar.set_postfix(val=f"{done.best_acc:.3f}", refresh=False)
            if cfg.patience and done.waited >= cfg.patience:
                log.info("early stop at step %d: %d validations without gain", step, done.waited)
                done.stopped = True
        every = cfg.checkpoint_interval or cfg.val_interval
        interrupted = self.stop_requested()
        if step % every == 0 or step == self.total or done.stopped or interrupted:
            self.save_state()
        if interrupted:
            folder = self.checkpoints.state.parent if self.checkpoints.state else None
            raise STOP.stopped(step, folder)
