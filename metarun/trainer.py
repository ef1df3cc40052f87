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
from metarun.errors import MetarunError
from metarun.evaluate import EvalResult, evaluate
from metarun.logger import Logger
from metarun.record import save_checkpoint
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
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    ) -> None:
        self.progress = progress
        self.algo, self.cfg, self.sampler, self.val_episodes = algo, cfg, sampler, val_episodes
        self.logger, self.autocast = logger, autocast
        self.checkpoint_path, self.checkpoint_meta = checkpoint_path, checkpoint_meta
        groups = algo.param_groups()
        self.params = [p for g in groups for p in g["params"]]
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

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes; frozen weights come back from the backbone config."""
        return {
            n: p.detach().to("cpu", copy=True)
            for n, p in self.algo.named_parameters()
            if p.requires_grad
        }

    def restore_best(self) -> None:
        if self.best_state is not None:
            missing = self.algo.load_state_dict(self.best_state, strict=False).unexpected_keys
            assert not missing, f"checkpoint keys unknown to the model: {missing}"

    def step(self, step: int) -> dict[str, float]:
        """One outer step over a meta-batch, in chunks of `episodes_per_backward`."""
        cfg = self.cfg
        assert self.optimizer is not None and self.scheduler is not None, "nothing to train"
        episodes = [self.sampler.sample() for _ in range(cfg.meta_batch_size)]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        chunk = max(1, cfg.episodes_per_backward)
        for start in range(0, len(episodes), chunk):
            part = episodes[start : start + chunk]
            with self.autocast():
                loss, metrics = self.algo.meta_loss(part)
            if not torch.isfinite(loss):
                value = float(loss.detach())
                raise MetarunError(
                    f"train/loss is {value} at step {step}: lower train.lr (now {cfg.lr}) or set "
                    "train.grad_clip; metrics.jsonl and the best checkpoint so far are kept"
                )
            (loss * len(part) / len(episodes)).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * len(part) / len(episodes)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return {f"train/{k}": v for k, v in totals.items()}

    def validate(self, step: int) -> EvalResult:
        result = evaluate(self.algo, self.val_episodes, self.autocast)
        improved = self.best_acc is None or result.acc > self.best_acc
        if improved:
            self.best_acc, self.best_step = result.acc, step
            self.best_state = self.trainable_state()
            if self.cfg.save_checkpoint:
                save_checkpoint(self.checkpoint_path, self.checkpoint_payload(step, result))
                self.saved_checkpoint = True
        self.logger.log(result.metrics("val") | {"val/best_acc": self.best_acc}, step)
        return result

    def checkpoint_payload(self, step: int, result: EvalResult) -> dict[str, Any]:
        return {
            "trainable_state": self.best_state,
            "step": step,
            "val_acc": result.acc,
            **self.checkpoint_meta,
        }

    def fit(self) -> FitResult:
        cfg = self.cfg
        if cfg.steps == 0 or not self.params:
            if cfg.steps and not self.params:
                log.info("nothing to meta-train (frozen encoder, no algorithm parameters): "
                         "evaluating only")  # fmt: skip
            return FitResult(0, None, None, 0.0, None)
        self.algo.train()
        bar = tqdm(range(1, cfg.steps + 1), desc="meta-train", disable=not self.progress)
        seconds, waited, done = 0.0, 0, 0
        for step in bar:
            start = time.perf_counter()
            metrics = self.step(step)
            seconds += time.perf_counter() - start
            done = step
            self.logger.log(metrics, step)
            shown = {k.removeprefix("train/"): f"{metrics[k]:.3f}"
                     for k in ("train/loss", "train/acc") if k in metrics}  # fmt: skip
            bar.set_postfix(**shown)
            if step % cfg.val_interval == 0 or step == cfg.steps:
                before = self.best_acc
                self.validate(step)
                waited = 0 if self.best_acc != before else waited + 1
                bar.set_postfix(val=f"{self.best_acc:.3f}", refresh=False)
                if cfg.patience and waited >= cfg.patience:
                    log.info("early stop at step %d: %d validations without gain", step, waited)
                    break
        self.restore_best()
        rate = done * cfg.meta_batch_size / seconds if seconds > 0 else math.nan
        return FitResult(done, self.best_step, self.best_acc, seconds, rate)
