"""The outer loop: meta-batches, mixed precision, clipping, validation, best checkpoint.

Algorithms own only their inner loop (`meta_loss`, `adapt`); everything else is here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metarun.algo import Algorithm
from metarun.config import TrainConfig
from metarun.contrastive import ContrastiveStage
from metarun.distributed import Dist
from metarun.errors import MetarunError
from metarun.evaluate import EvalResult, evaluate
from metarun.interrupts import STOP
from metarun.logger import Logger
from metarun.record import save_checkpoint
from metarun.resume import rng_state, set_rng_state
from metarun.task import Episode, EpisodeSampler

log = logging.getLogger("metarun")


@dataclass
class FitResult:
    steps_done: int
    best_step: int | None
    best_val_acc: float | None
    train_seconds: float
    episodes_per_second: float | None


def build_optimizer(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`params`: tensors or torch parameter groups (a group's own "lr" overrides train.lr)."""
    if cfg.optimizer == "adamw":
        # One fused kernel over all tensors instead of a loop of small ops per tensor.
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise MetarunError(f"train.optimizer={cfg.optimizer}; use adamw or sgd")


class Trainer:
    def __init__(
        self,
        algo: Algorithm,
        cfg: TrainConfig,
        sampler: EpisodeSampler,
        val_episodes: list[Episode],
        logger: Logger,
        checkpoint_path: Path,
        checkpoint_meta: dict[str, Any],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        progress: bool = True,
        state_path: Path | None = None,
        dist: Dist | None = None,
        contrastive: ContrastiveStage | None = None,
    ) -> None:
        dist = dist or Dist()
        self.progress = progress and dist.main
        self.algo, self.cfg, self.sampler, self.val_episodes = algo, cfg, sampler, val_episodes
        self.logger, self.autocast, self.dist = logger, autocast, dist
        self.checkpoint_path, self.checkpoint_meta = checkpoint_path, checkpoint_meta
        self.state_path = state_path
        if dist.active and cfg.meta_batch_size < dist.world:
            raise MetarunError(
                f"train.meta_batch_size={cfg.meta_batch_size} is smaller than the {dist.world} "
                "processes; each needs at least one episode per step"
            )
        groups = algo.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        # train.contrastive_steps: steps 1..pre_steps train the encoder contrastively, the
        # `cfg.steps` episodic steps follow; validation, checkpoints and resume span both.
        self.contrastive = contrastive
        self.pre_steps = contrastive.steps if contrastive is not None else 0
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
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_acc: float | None = None
        self.best_step: int | None = None
        self.saved_checkpoint = False
        self.done, self.waited, self.seconds, self.stopped = 0, 0, 0.0, False
        self.episodic_seconds = 0.0  # the episodic steps' share of `seconds` (episodes/s)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes; frozen weights come back from the backbone config."""
        return {
            n: p.detach().to("cpu", copy=True)
            for n, p in self.algo.named_parameters()
            if p.requires_grad
        }

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        unknown = self.algo.load_state_dict(state, strict=False).unexpected_keys
        if unknown:
            raise MetarunError(f"checkpoint keys unknown to this model: {unknown[:5]}")

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.load_trainable(self.best_state)

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step: contrastive during the first `pre_steps`, episodic after."""
        cfg = self.cfg
        assert self.optimizer is not None and self.scheduler is not None, "nothing to train"
        self.optimizer.zero_grad(set_to_none=True)
        contrastive = 0 < step <= self.pre_steps  # steps count from 1; benchmarks pass 0
        totals = self.contrastive_losses() if contrastive else self.episodic_losses()
        totals = self.dist.sum(totals, self.params[0].device)
        if not math.isfinite(totals["loss"]):
            raise MetarunError(
                f"train/loss is {totals['loss']} at step {step}: lower train.lr (now {cfg.lr}) "
                "or set train.grad_clip; metrics.jsonl and the checkpoints so far are kept"
            )
        self.dist.all_reduce_grads(self.params)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return {f"train/{k}": v for k, v in totals.items()}

    def contrastive_losses(self) -> dict[str, float]:
        """This process's contrastive batch, backpropagated at weight 1 / processes."""
        assert self.contrastive is not None
        with self.autocast():
            loss, metrics = self.contrastive.loss(self.algo.encoder)
        if torch.isfinite(loss):
            (loss / self.dist.world).backward()
        metrics["loss"] = float(loss.detach())
        return {k: v / self.dist.world for k, v in metrics.items()}

    def episodic_losses(self) -> dict[str, float]:
        """One meta-batch, in chunks of `episodes_per_backward`.

        Every process draws the same meta-batch (index draws are cheap) and backpropagates its
        own shard; summing the shards' gradients gives the whole meta-batch's gradient, so N
        processes take exactly the step one process would.
        """
        cfg = self.cfg
        episodes = [self.sampler.sample() for _ in range(cfg.meta_batch_size)]
        mine = self.dist.shard(episodes)
        totals: dict[str, float] = {}
        chunk = max(1, cfg.episodes_per_backward)
        for start in range(0, len(mine), chunk):
            part = mine[start : start + chunk]
            with self.autocast():
                loss, metrics = self.algo.meta_loss(part)
            weight = len(part) / len(episodes)
            if torch.isfinite(loss):  # a NaN is reported below, once every process knows
                (loss * weight).backward()
            for key, value in {**metrics, "loss": float(loss.detach())}.items():
                totals[key] = totals.get(key, 0.0) + value * weight
        return totals

    def validate(self, step: int) -> EvalResult:
        result = evaluate(self.algo, self.val_episodes, self.autocast, self.dist)
        improved = self.best_acc is None or result.acc > self.best_acc
        if improved:
            self.best_acc, self.best_step = result.acc, step
            self.best_state = self.trainable_state()
            if self.cfg.save_checkpoint and self.dist.main:
                save_checkpoint(self.checkpoint_path, self.checkpoint_payload(step, result))
                self.saved_checkpoint = True
        self.waited = 0 if improved else self.waited + 1
        self.logger.log(result.metrics("val") | {"val/best_acc": self.best_acc}, step)
        return result

    def checkpoint_payload(self, step: int, result: EvalResult) -> dict[str, Any]:
        return {
            "trainable_state": self.best_state,
            "step": step,
            "val_acc": result.acc,
            **self.checkpoint_meta,
        }

    def state(self) -> dict[str, Any]:
        """Everything `resume` needs to continue exactly where this step ended."""
        assert self.optimizer is not None and self.scheduler is not None
        return {
            "step": self.done, "trainable_state": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": self.dist.gather(rng_state()),  # per process: dropout draws differ by shard
            "sampler": self.sampler.state_dict(), "best_state": self.best_state,
            "best_acc": self.best_acc, "best_step": self.best_step, "waited": self.waited,
            "seconds": self.seconds, "episodic_seconds": self.episodic_seconds,
            "stopped": self.stopped,
            "contrastive_sampler": self.contrastive.sampler.state_dict() if self.contrastive
            else None,
            "saved_checkpoint": self.saved_checkpoint, "wandb_run_id": self.logger.wandb_id,
            **self.checkpoint_meta,
        }  # fmt: skip

    def save_state(self) -> None:
        state = self.state()  # every process takes part in gathering the RNG states
        if self.state_path is not None and self.dist.main:
            save_checkpoint(self.state_path, state)

    def resume(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        self.load_trainable(state["trainable_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        self.sampler.load_state_dict(state["sampler"])
        self.best_state, self.best_acc = state["best_state"], state["best_acc"]
        self.best_step, self.waited = state["best_step"], state["waited"]
        self.done, self.seconds, self.stopped = state["step"], state["seconds"], state["stopped"]
        self.saved_checkpoint = state["saved_checkpoint"]
        self.episodic_seconds = state.get("episodic_seconds", self.seconds)
        if self.contrastive is not None and state.get("contrastive_sampler"):
            self.contrastive.sampler.load_state_dict(state["contrastive_sampler"])
        log.info("resumed at step %d of %d", self.done, self.total)

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (all must stop at the same step)."""
        return self.dist.sum({"stop": float(STOP.requested)}, self.params[0].device)["stop"] > 0

    def fit(self) -> FitResult:
        cfg = self.cfg
        if self.total == 0 or not self.params:
            if self.total and not self.params:
                log.info("nothing to meta-train (frozen encoder, no algorithm parameters): "
                         "evaluating only")  # fmt: skip
            return FitResult(0, None, None, 0.0, None)
        if cfg.val_at_start and self.done == 0 and self.best_acc is None:
            self.validate(0)  # the starting weights compete with every trained step
        self.algo.train()
        first = self.done + 1
        bar = tqdm(range(first, self.total + 1), desc="meta-train", disable=not self.progress,
                   initial=self.done, total=self.total)  # fmt: skip
        with STOP.deferred():
            for step in bar if not self.stopped else ():
                start = time.perf_counter()
                metrics = self.step(step)
                elapsed = time.perf_counter() - start
                self.seconds += elapsed
                self.episodic_seconds += elapsed if step > self.pre_steps else 0.0
                self.done = step
                self.logger.log(metrics, step)
                shown = {k.removeprefix("train/"): f"{metrics[k]:.3f}"
                         for k in ("train/loss", "train/acc", "train/contrastive_acc")
                         if k in metrics}  # fmt: skip
                bar.set_postfix(**shown)
                validated = step % cfg.val_interval == 0 or step == self.total
                if validated:
                    self.validate(step)
                    bar.unpause()  # the bar's rate counts training steps, not validation
                    bar.set_postfix(val=f"{self.best_acc:.3f}", refresh=False)
                    if cfg.patience and self.waited >= cfg.patience:
                        log.info("early stop at step %d: %d validations without gain",
                                 step, self.waited)  # fmt: skip
                        self.stopped = True
                every = cfg.checkpoint_interval or cfg.val_interval
                interrupted = self.stop_requested()
                if step % every == 0 or step == self.total or self.stopped or interrupted:
                    self.save_state()
                if interrupted:
                    raise STOP.stopped(step, self.state_path.parent)
                if self.stopped:
                    break
        self.restore_best()
        episodic = max(0, self.done - self.pre_steps) * cfg.meta_batch_size
        rate = episodic / self.episodic_seconds if self.episodic_seconds > 0 else math.nan
        return FitResult(self.done, self.best_step, self.best_acc, self.seconds, rate)
