"""The experiment recipe: compose the pieces a config names, meta-train, test, write the record.

Read top to bottom, `run` is the whole experiment; each step is a small function beside it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metarun.algo import build_algorithm
from metarun.backbone import load_backbone
from metarun.config import HardwareConfig, MetarunConfig
from metarun.distributed import Dist, init_distributed, shutdown
from metarun.errors import MetarunError, RunInterrupted
from metarun.evaluate import evaluate
from metarun.logger import JsonlSink, Logger, StdoutSink, WandbSink
from metarun.record import git_commit, load_checkpoint, versions, write_json
from metarun.resume import STATE_FILE, check_same_run, trim_metrics
from metarun.task import (
    STREAM,
    EpisodeSampler,
    TaskData,
    check_feasible,
    fixed_episodes,
    load_task,
)
from metarun.trainer import Trainer

log = logging.getLogger("metarun")
PRECISIONS = ("fp32", "bf16")


def setup_hardware(hw: HardwareConfig) -> tuple[torch.device, Callable, Dist]:
    """The device, an autocast factory and the process group; fails early when the device is
    not there. Under torchrun with `distributed`, "cuda" means this process's GPU."""
    if hw.precision not in PRECISIONS:
        raise MetarunError(f"hardware.precision={hw.precision}; use one of {', '.join(PRECISIONS)}")
    try:
        device = torch.device(hw.device)
    except RuntimeError as err:
        raise MetarunError(f"hardware.device={hw.device} is not a device name") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetarunError(
            f"hardware.device={hw.device} but no CUDA GPU is visible; use hardware=cpu"
        )
    dist = Dist()
    if hw.distributed:
        dist, local_rank = init_distributed(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    if hw.threads > 0:
        torch.set_num_threads(hw.threads)
    torch.set_float32_matmul_precision("high" if hw.tf32 else "highest")
    if hw.precision == "bf16":
        return device, lambda: torch.autocast(device.type, dtype=torch.bfloat16), dist
    return device, contextlib.nullcontext, dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_logger(
    cfg: MetarunConfig, run_dir: Path, name: str, group: str | None, resolved: dict,
    wandb_id: str | None, dist: Dist,
) -> Logger:  # fmt: skip
    """Stdout and metrics.jsonl always, W&B when asked (continuing `wandb_id` on resume); only
    the main process logs."""
    if not dist.main:
        return Logger([])
    train_every = 0 if cfg.logger.progress else 10
    sinks: list = [StdoutSink(train_every), JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logger.wandb:
        sinks.append(WandbSink(cfg.logger, run_dir, name, group, resolved, wandb_id))
    return Logger(sinks)


def make_episodes(data: TaskData, cfg: MetarunConfig) -> tuple[EpisodeSampler, list, list]:
    """Training sampler (run seed) and the fixed validation / test episodes (eval seed)."""
    task = cfg.task
    shape = (task.way, task.shots, task.queries)
    sampler = EpisodeSampler(data.splits["train"], *shape, seed=[cfg.seed, STREAM["train"]])
    val = []
    if cfg.train.steps > 0:
        val = fixed_episodes(
            data.splits["valid"], *shape, task.val_episodes, task.eval_seed, "valid"
        )
    test = fixed_episodes(data.splits["test"], *shape, task.test_episodes, task.eval_seed, "test")
    return sampler, val, test


def run_facts(cfg: MetarunConfig, data: TaskData, device: torch.device) -> dict[str, Any]:
    task = cfg.task
    return {
        "way": task.way,
        "shots": task.shots,
        "queries": task.queries,
        "seeds": {"seed": cfg.seed, "eval_seed": task.eval_seed, "split_seed": task.split_seed,
                  "split": task.split},
        "data": data.summary(),
        "device": str(device),
    }  # fmt: skip


def prepare_run_dir(
    run_dir: Path, typed: MetarunConfig, resolved: dict, dist: Dist
) -> dict[str, Any] | None:
    """Create the run folder, or find the state of the run it holds (resume); main process
    only writes. Returns the saved state to resume from, if any."""
    state_path = run_dir / STATE_FILE
    state = None
    if state_path.is_file():
        check_same_run(run_dir, resolved)
        state = load_checkpoint(state_path)
        if dist.main:
            trim_metrics(run_dir / "metrics.jsonl", state["step"])
    elif typed.train.resume:
        raise MetarunError(
            f"train.resume={typed.train.resume}: there is no {STATE_FILE} in it to resume from"
        )
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    return state


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], group: str | None) -> float:
    """Run one experiment into `run_dir`; returns the best validation accuracy (nan if none)."""
    started = time.time()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    typed: MetarunConfig = OmegaConf.to_object(cfg)
    device, autocast, dist = setup_hardware(typed.hardware)
    try:
        return _run(typed, cfg, resolved, dist.broadcast(run_dir), choices, group, device,
                    autocast, dist, started)  # fmt: skip
    finally:
        shutdown(dist)


def _run(
    typed: MetarunConfig, cfg: DictConfig, resolved: dict, run_dir: Path, choices: dict,
    group: str | None, device: torch.device, autocast: Callable, dist: Dist, started: float,
) -> float:  # fmt: skip
    state = prepare_run_dir(run_dir, typed, resolved, dist)
    env = {"choices": choices, "versions": versions(), "git_commit": git_commit()}
    if dist.main:
        write_json(run_dir / "environment.json", env)
    seed_everything(typed.seed)
    data = load_task(typed.task)
    needed = ("train", "valid", "test") if typed.train.steps > 0 else ("test",)
    check_feasible(data, typed.task, needed)
    log.info("task %s: %s", choices.get("task"), data.summary())
    encoder = load_backbone(typed.backbone)
    encoder.set_texts(data.texts)
    algo = build_algorithm(cfg.algo, encoder, typed.task.way)
    algo.prepare(data)
    algo = algo.to(device)
    dist.sync_module(algo)
    sampler, val, test = make_episodes(data, typed)

    wandb_id = state["wandb_run_id"] if state else None
    logger = build_logger(typed, run_dir, run_dir.name, group, resolved, wandb_id, dist)
    summary: dict[str, Any] = {"status": "failed", "run_dir": str(run_dir), **choices}
    try:
        trainer = Trainer(algo, typed.train, sampler, val, logger, run_dir / "checkpoint.pt",
                          {"config": resolved, **env}, autocast, typed.logger.progress,
                          run_dir / STATE_FILE, dist)  # fmt: skip
        if state is not None and trainer.params:
            trainer.resume(state)
            summary["resumed_from_step"] = state["step"]
        fit = trainer.fit()
        result = evaluate(algo, test, autocast, dist)
        logger.log(result.metrics("test"), fit.steps_done)
        if dist.main:
            write_json(run_dir / "test_episodes.json", {
                "eval_seed": typed.task.eval_seed, "accuracy": result.accuracies.tolist(),
                "macro_f1": result.macro_f1s.tolist(),
                "classes": [list(ep.classes) for ep in test],
            })  # fmt: skip
        summary |= {
            "status": "completed",
            "test": {"acc": result.acc, "acc_ci95": result.ci95, "f1": result.f1,
                     "episodes": len(test)},
            "val": {"best_acc": fit.best_val_acc, "best_step": fit.best_step, "episodes": len(val)},
            "train": asdict(fit),
            "checkpoint": str(trainer.checkpoint_path) if trainer.saved_checkpoint else None,
        }  # fmt: skip
        log.info("test accuracy %.2f%% ± %.2f (95%% CI, %d episodes), macro-F1 %.2f%%",
                 100 * result.acc, 100 * result.ci95, len(test), 100 * result.f1)  # fmt: skip
        return fit.best_val_acc if fit.best_val_acc is not None else float("nan")
    except MetarunError as err:
        summary["error"] = str(err)
        summary["status"] = "interrupted" if isinstance(err, RunInterrupted) else "failed"
        raise
    finally:
        summary |= run_facts(typed, data, device) | {
            "peak_memory_mb": peak_memory_mb(device), "wall_seconds": time.time() - started,
            "wandb_run_id": logger.wandb_id, "versions": env["versions"],
            "git_commit": env["git_commit"], "processes": dist.world,
        }  # fmt: skip
        if dist.main:
            write_json(run_dir / "summary.json", summary)
        logger.summary({k: v for k, v in summary.items() if k in ("test", "val", "train")})
        logger.close()
