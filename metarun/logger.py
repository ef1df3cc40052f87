"""One small logging interface with three sinks: stdout, metrics.jsonl, Weights & Biases.

Metric names are namespaced (`train/`, `val/`, `test/`); every sink gets the same dicts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from metarun.config import LoggerConfig, MetarunConfig
from metarun.rundir.files import finite

log = logging.getLogger("metarun")


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class StdoutSink:
    """Validation and test lines; training lines every `train_every` steps (0: never, as when a
    progress bar already shows them)."""

    def __init__(self, train_every: int) -> None:
        self.train_every = train_every

    def log(self, metrics: dict[str, float], step: int) -> None:
        show_train = self.train_every > 0 and step % self.train_every == 0
        shown = {k: v for k, v in metrics.items() if show_train or not k.startswith("train/")}
        if shown:
            text = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
            )
            log.info("step %d  %s", step, text)

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class JsonlSink:
    """metrics.jsonl: one line per log call, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.file.write(json.dumps(finite({"step": step, **metrics})) + "\n")
            self.file.flush()
        except OSError as err:  # a full disk names no file: name it
            err.filename = err.filename or self.file.name
            raise

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.file.close()


class WandbSink:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        name: str,
        group: str | None,
        config: dict,
        resume_id: str | None = None,
        job_type: str | None = None,
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            group=cfg.group or group,
            job_type=job_type,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", cfg.mode),
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def close(self, failed: bool = False) -> None:
        """A failed run finishes with exit code 1, so the dashboard shows it as failed."""
        self.run.finish(exit_code=1 if failed else 0)


class Logger:
    """Fans each call out to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(values)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)

    @property
    def wandb_id(self) -> str | None:
        return next((s.id for s in self.sinks if isinstance(s, WandbSink)), None)


def run_name(cfg: MetarunConfig, choices: dict[str, str]) -> str:
    """What a person reads in a dashboard: algorithm, backbone, task, shape, seed."""
    task = cfg.task
    return (f"{choices.get('algo', '?')}-{choices.get('backbone', '?')}-"
            f"{choices.get('task', '?')}-{task.way}w{task.shots}s-seed{cfg.seed}")  # fmt: skip


def wandb_config(cfg: MetarunConfig, choices: dict[str, str], resolved: dict) -> dict:
    """The chosen option of every group as top-level keys (filter and group by them), then the
    whole resolved config under `cfg`."""
    task = cfg.task
    return {**choices, "way": task.way, "shots": task.shots, "queries": task.queries,
            "seed": cfg.seed, "split": task.split, "meta_steps": cfg.train.steps,
            "cfg": resolved}  # fmt: skip


def build_logger(
    cfg: MetarunConfig, run_dir: Path, choices: dict[str, str], family: str, group: str | None,
    resolved: dict, wandb_id: str | None, main: bool,
) -> Logger:  # fmt: skip
    """Stdout and metrics.jsonl always, W&B when asked (continuing `wandb_id` on resume, the
    run grouped by sweep and typed by the algorithm's `family`); only the main process logs."""
    if not main:
        return Logger([])
    train_every = 0 if cfg.logger.progress else 10
    sinks: list[Sink] = [StdoutSink(train_every), JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logger.wandb:
        config = wandb_config(cfg, choices, resolved)
        sinks.append(WandbSink(cfg.logger, run_dir, run_name(cfg, choices), group, config,
                               wandb_id, job_type=family))  # fmt: skip
    return Logger(sinks)
