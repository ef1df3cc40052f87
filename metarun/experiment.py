"""The experiment recipe: compose the pieces a config names, meta-train, test, write the record.

Read top to bottom, `run` is the whole experiment; each step is a small function beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from metarun.algo import Algorithm, algorithm_class, algorithm_config, build_algorithm
from metarun.backbone import Encoder, load_backbone
from metarun.checks import check_config
from metarun.config import HardwareConfig, MetarunConfig, TrainConfig
from metarun.contrastive import ClassBatchSampler, ContrastiveStage
from metarun.distributed import Dist, init_distributed, shutdown
from metarun.errors import MetarunError, RunInterrupted, os_error_in
from metarun.evaluate import EvalResult, evaluate
from metarun.interrupts import STOP
from metarun.logger import JsonlSink, Logger, StdoutSink, WandbSink
from metarun.record import git_commit, load_checkpoint, versions, write_json
from metarun.resume import STATE_FILE, check_same_data, check_same_run, trim_metrics
from metarun.reuse import check_same_model, load_trained, source_config
from metarun.rundir import (
    FolderLock,
    attach_log,
    claim,
    clear,
    detach_log,
    file_log,
    os_error_message,
    remove_stale_tmp,
    run_files,
    write_hydra_files,
)
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
TRUNCATION_WARNING = 0.05


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
    resolved: dict, wandb_id: str | None, dist: Dist,
) -> Logger:  # fmt: skip
    """Stdout and metrics.jsonl always, W&B when asked (continuing `wandb_id` on resume); only
    the main process logs."""
    if not dist.main:
        return Logger([])
    train_every = 0 if cfg.logger.progress else 10
    sinks: list = [StdoutSink(train_every), JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logger.wandb:
        config = wandb_config(cfg, choices, resolved)
        sinks.append(WandbSink(cfg.logger, run_dir, run_name(cfg, choices), group, config,
                               wandb_id, job_type=family))  # fmt: skip
    return Logger(sinks)


def trains(cfg: TrainConfig) -> bool:
    """Whether the run has training steps (episodic or contrastive), hence validation."""
    return cfg.steps + cfg.contrastive_steps > 0


def contrastive_stage(data: TaskData, cfg: MetarunConfig, rank: int) -> ContrastiveStage | None:
    """train.contrastive_steps: batches of the meta-train classes (run seed, this process's
    own stream), the class names among them when the episodes' support sets have them."""
    train = cfg.train
    if train.contrastive_steps == 0:
        return None
    names = data.name_ids if cfg.task.names_as_examples else None
    sampler = ClassBatchSampler(data.splits["train"], train.contrastive_classes,
                                train.contrastive_per_class,
                                [cfg.seed, STREAM["contrastive"], rank], names)  # fmt: skip
    return ContrastiveStage(sampler, train.contrastive_steps, train.contrastive_temperature)


def make_episodes(data: TaskData, cfg: MetarunConfig) -> tuple[EpisodeSampler, list, list]:
    """Training sampler (run seed) and the fixed validation / test episodes (eval seed)."""
    task = cfg.task
    shape = (task.way, task.shots, task.queries)
    names = data.name_ids if task.names_as_examples else None
    sampler = EpisodeSampler(data.splits["train"], *shape, [cfg.seed, STREAM["train"]], names)
    val = []
    if trains(cfg.train):
        val = fixed_episodes(data.splits["valid"], *shape, task.val_episodes, task.eval_seed,
                             "valid", names)  # fmt: skip
    test = fixed_episodes(data.splits["test"], *shape, task.test_episodes, task.eval_seed,
                          "test", names)  # fmt: skip
    return sampler, val, test


def run_facts(cfg: MetarunConfig, data: TaskData | None, device: torch.device) -> dict[str, Any]:
    task = cfg.task
    return {
        "way": task.way,
        "shots": task.shots,
        "queries": task.queries,
        "seeds": {"seed": cfg.seed, "eval_seed": task.eval_seed, "split_seed": task.split_seed,
                  "split": task.split},
        "data": data.summary() if data is not None else None,
        "device": str(device),
    }  # fmt: skip


def check_before_loading(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], group: str | None
) -> None:
    """Keys, value ranges and the algorithm class, before any data, model or file. A sweep's
    job still records in its own fresh folder why it never started (the sweep goes on); a
    single command writes nothing, so the corrected command can use the same run_dir."""
    try:
        check_config(cfg)
        cls = algorithm_class(cfg.algo.get("_target_"), cfg.get("algo_modules"))
        algorithm_config(cfg.algo, cls)
    except MetarunError as err:
        main = os.environ.get("RANK", "0") == "0"
        if group is not None and main and not run_files(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            failed = {"status": "failed", "error": str(err), "run_dir": str(run_dir), **choices}
            write_json(run_dir / "summary.json", failed)
        elif group is None and main:
            remove_if_empty(run_dir)
        raise


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates a run's folder before metarun sees the command: a command refused at
    once should not leave an empty folder behind."""
    with contextlib.suppress(OSError):  # not empty, or already gone: nothing to tidy
        run_dir.rmdir()


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], group: str | None) -> float:
    """Run one experiment into `run_dir`; returns the best validation accuracy (nan if none)."""
    started = time.time()
    check_before_loading(cfg, run_dir, choices, group)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    typed: MetarunConfig = OmegaConf.to_object(cfg)
    device, autocast, dist = setup_hardware(typed.hardware)
    lock: FolderLock | None = None
    try:
        with STOP.installed():
            run_dir = dist.broadcast(run_dir)
            if dist.main:  # held until the run ends: one live process per folder
                lock = FolderLock(run_dir).acquire()
            claimed = claim_run_dir(run_dir, typed, resolved)
            return _run(typed, cfg, resolved, run_dir, claimed, choices, group, device,
                        autocast, dist, started)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()
        shutdown(dist)


@dataclass
class Claimed:
    """How this command uses its folder, and what a resume read before writing anything."""

    mode: str  # fresh, resume or overwrite
    state: dict | None = None  # last.pt, when resuming
    data: TaskData | None = None  # the task, read to compare with the state's


def claim_run_dir(run_dir: Path, typed: MetarunConfig, resolved: dict) -> Claimed:
    """The folder's mode; a resume is checked (config, then data) before anything is written,
    so a refused resume leaves the folder as it was."""
    mode = claim(run_dir, typed.run_dir_mode, bool(typed.train.resume))
    if mode != "resume":
        return Claimed(mode)
    check_same_run(run_dir, resolved)
    state = load_checkpoint(run_dir / STATE_FILE)
    data = load_task(typed.task)
    check_same_data(run_dir, state, data.summary())
    return Claimed(mode, state, data)


def open_run_dir(
    run_dir: Path, claimed: Claimed, cfg: DictConfig, resolved: dict, env: dict
) -> logging.Handler:
    """The claimed folder's files (main process): afresh when overwriting, stale temporary
    files gone, metrics past the resumed step dropped, `.hydra/`, metarun.log, the config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if claimed.mode == "overwrite":
        clear(run_dir)
    remove_stale_tmp(run_dir)
    handler = attach_log(run_dir)
    write_hydra_files(run_dir, cfg)
    if claimed.state is not None:
        trim_metrics(run_dir / "metrics.jsonl", claimed.state["step"])
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    write_json(run_dir / "environment.json", env)
    return handler


def failure(err: BaseException) -> tuple[str, BaseException]:
    """The status, and the error to raise: a write that failed (disk full, read-only) becomes
    one line naming the file; it goes into metarun.log either way."""
    status = "interrupted" if isinstance(err, RunInterrupted | KeyboardInterrupt) else "failed"
    os_error = os_error_in(err)
    if os_error is not None and (message := os_error_message(os_error)):
        err = MetarunError(message)
    if isinstance(err, MetarunError | KeyboardInterrupt):
        file_log.error("%s: %s", status, err or "Ctrl-C")
    else:  # a bug: its traceback belongs in the record
        file_log.error("%s: %s", status, err, exc_info=err)
    return status, err


def _run(
    typed: MetarunConfig, cfg: DictConfig, resolved: dict, run_dir: Path, claimed: Claimed,
    choices: dict, group: str | None, device: torch.device, autocast: Callable, dist: Dist,
    started: float,
) -> float:  # fmt: skip
    env = {"choices": choices, "versions": versions(), "git_commit": git_commit()}
    handler = open_run_dir(run_dir, claimed, cfg, resolved, env) if dist.main else None
    state = claimed.state
    summary: dict[str, Any] = {"status": "failed", "run_dir": str(run_dir), **choices}
    data: TaskData | None = None
    logger: Logger | None = None
    try:
        seed_everything(typed.seed)
        data = claimed.data or load_task(typed.task)
        needed = ("train", "valid", "test") if trains(typed.train) else ("test",)
        check_feasible(data, typed.task, needed)
        log.info("task %s: %s", choices.get("task"), data.summary())
        algo = build_model(typed, cfg, resolved, data, summary).to(device)
        dist.sync_module(algo)
        sampler, val, test = make_episodes(data, typed)
        wandb_id = state["wandb_run_id"] if state else None
        logger = build_logger(typed, run_dir, choices, algo.family, group, resolved, wandb_id,
                              dist)  # fmt: skip
        trainer = Trainer(algo, typed.train, sampler, val, logger, run_dir / "checkpoint.pt",
                          {"config": resolved, **env, "data": data.summary()}, autocast,
                          typed.logger.progress,
                          run_dir / STATE_FILE, dist,
                          contrastive_stage(data, typed, dist.rank))  # fmt: skip
        if state is not None and trainer.params:
            trainer.resume(state)
            summary["resumed_from_step"] = state["step"]
        with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
            fit = trainer.fit()
            progress = typed.logger.progress and dist.main
            result = evaluate(algo, test, autocast, dist, progress="test" if progress else None)
        logger.log(result.metrics("test"), fit.steps_done)
        if dist.main:
            write_json(run_dir / "test_episodes.json", episode_record(result, test, typed))
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
    except BaseException as err:
        summary["status"], raised = failure(err)
        summary["error"] = str(raised) or type(raised).__name__
        if raised is not err:
            raise raised from err
        raise
    finally:
        summary |= run_facts(typed, data, device) | {
            "peak_memory_mb": peak_memory_mb(device), "wall_seconds": time.time() - started,
            "wandb_run_id": logger.wandb_id if logger else None, "versions": env["versions"],
            "git_commit": env["git_commit"], "processes": dist.world,
        }  # fmt: skip
        finish(run_dir, summary, logger, handler, dist)


def build_model(
    typed: MetarunConfig, cfg: DictConfig, resolved: dict, data: TaskData, summary: dict
) -> Algorithm:
    """The backbone with the task's texts, the algorithm on it, and (init_from) the weights of
    a trained run; what was truncated and loaded goes into the summary."""
    encoder = load_backbone(typed.backbone)
    encoder.set_texts(data.texts)
    summary["backbone_params"] = sum(p.numel() for p in encoder.model.parameters())
    summary["truncated_texts"] = check_truncation(encoder, typed.backbone.max_length)
    algo = build_algorithm(typed.algo, encoder, typed.task.way, typed.algo_modules)
    algo.prepare(data)
    if typed.init_from:
        source = Path(typed.init_from)
        check_same_model(source_config(source), resolved, source)
        summary["init_from"] = load_trained(algo, source)
    return algo


def episode_record(result: EvalResult, test: list, typed: MetarunConfig) -> dict[str, Any]:
    """test_episodes.json: what paired comparisons read (metarun-report)."""
    return {
        "eval_seed": typed.task.eval_seed, "accuracy": result.accuracies.tolist(),
        "macro_f1": result.macro_f1s.tolist(), "classes": [list(ep.classes) for ep in test],
    }  # fmt: skip


def finish(
    run_dir: Path, summary: dict, logger: Logger | None, handler: logging.Handler | None,
    dist: Dist,
) -> None:  # fmt: skip
    """summary.json for every run, completed or not; W&B told whether it failed."""
    try:
        if dist.main:
            write_json(run_dir / "summary.json", summary)
    except OSError as err:  # the disk that failed the run may refuse this too: say so, go on
        file_log.error("summary.json not written: %s", os_error_message(err) or err)
    finally:
        if logger is not None:
            logger.summary({k: v for k, v in summary.items()
                            if k in ("status", "error", "test", "val", "train")})  # fmt: skip
            logger.close(failed=summary["status"] != "completed")
        if handler is not None:
            detach_log(handler)


def check_truncation(encoder: Encoder, max_length: int) -> float:
    """The fraction of the task's texts cut at backbone.max_length; a warning past 5%."""
    fraction = encoder.table.truncated_fraction
    if fraction > TRUNCATION_WARNING:
        log.warning("backbone.max_length=%d cuts %.0f%% of the texts; raise it if accuracy "
                    "matters more than speed", max_length, 100 * fraction)  # fmt: skip
    return fraction
