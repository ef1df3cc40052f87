"""The experiment recipe: compose the pieces a config names, meta-train, test, write the record.

Read top to bottom, `run` is the whole experiment; each step is a small function beside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from metarun.algo import Algorithm, build_algorithm
from metarun.algo.adapted import is_lora
from metarun.algo.inner import adapted_encoder_weights
from metarun.backbone import Encoder, load_backbone
from metarun.backbone.lowp import output_layer_in_bf16, store_frozen_in_bf16
from metarun.config import MetarunConfig, TrainConfig
from metarun.distributed import Dist, shutdown
from metarun.errors import MetarunError, RunInterrupted, os_error_in
from metarun.hardware import (
    Hardware,
    choose_precision,
    peak_memory_mb,
    seed_everything,
    setup_hardware,
)
from metarun.interrupts import STOP
from metarun.logger import Logger, build_logger
from metarun.rundir.files import git_commit, load_checkpoint, versions, write_json
from metarun.rundir.folder import (
    STATE_FILE,
    FolderLock,
    attach_log,
    claim,
    clear,
    detach_log,
    file_log,
    os_error_message,
    remove_stale_tmp,
    write_hydra_files,
)
from metarun.rundir.init_from import check_same_model, load_trained, source_config
from metarun.rundir.resume import check_same_data, check_same_run, trim_metrics
from metarun.task import (
    STREAM,
    EpisodeSampler,
    TaskData,
    check_feasible,
    fixed_episodes,
    load_task,
)
from metarun.train import Checkpoints, Episodes, EvalResult, Runtime, Trainer, evaluate
from metarun.train.contrastive import ClassBatchSampler, ContrastiveStage

log = logging.getLogger("metarun")
TRUNCATION_WARNING = 0.05


@dataclass
class RunSpec:
    """One experiment as the command gave it: the config as composed (`cfg`, for Hydra's own
    files), typed (what every component is built from) and resolved (the record: config.yaml,
    checkpoints, W&B), and where it runs."""

    cfg: DictConfig
    typed: MetarunConfig
    resolved: dict
    run_dir: Path
    choices: dict[str, str]
    group: str | None  # the multirun's sweep folder name; None for a single run
    started: float = field(default_factory=time.time)


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


def run_facts(cfg: MetarunConfig, data: TaskData | None, device: Any) -> dict[str, Any]:
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


def run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], group: str | None) -> float:
    """Run one experiment into `run_dir`; returns the best validation accuracy (nan if none).
    `cfg` has passed preflight.check_before_loading (the CLI runs it before importing this
    module, so that a refused command never loads torch)."""
    started = time.time()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    typed: MetarunConfig = OmegaConf.to_object(cfg)
    hw = setup_hardware(typed.hardware)
    lock: FolderLock | None = None
    try:
        with STOP.installed():
            run_dir = hw.dist.broadcast(run_dir)
            if hw.dist.main:  # held until the run ends: one live process per folder
                lock = FolderLock(run_dir).acquire()
            spec = RunSpec(cfg, typed, resolved, run_dir, choices, group, started)
            return _run(spec, claim_run_dir(spec), hw)
    finally:
        if lock is not None:
            lock.release()
        shutdown(hw.dist)


@dataclass
class Claimed:
    """How this command uses its folder, and what a resume read before writing anything."""

    mode: str  # fresh, resume or overwrite
    state: dict | None = None  # last.pt, when resuming
    data: TaskData | None = None  # the task, read to compare with the state's


def claim_run_dir(spec: RunSpec) -> Claimed:
    """The folder's mode; a resume is checked (config, then data) before anything is written,
    so a refused resume leaves the folder as it was."""
    run_dir, typed = spec.run_dir, spec.typed
    mode = claim(run_dir, typed.run_dir_mode, bool(typed.train.resume))
    if mode != "resume":
        return Claimed(mode)
    check_same_run(run_dir, spec.resolved)
    state = load_checkpoint(run_dir / STATE_FILE)
    data = load_task(typed.task)
    check_same_data(run_dir, state, data.summary())
    return Claimed(mode, state, data)


def open_run_dir(spec: RunSpec, claimed: Claimed, env: dict) -> logging.Handler:
    """The claimed folder's files (main process): afresh when overwriting, stale temporary
    files gone, metrics past the resumed step dropped, `.hydra/`, metarun.log, the config."""
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if claimed.mode == "overwrite":
        clear(run_dir)
    remove_stale_tmp(run_dir)
    handler = attach_log(run_dir)
    write_hydra_files(run_dir, spec.cfg)
    if claimed.state is not None:
        trim_metrics(run_dir / "metrics.jsonl", claimed.state["step"])
    OmegaConf.save(OmegaConf.create(spec.resolved), run_dir / "config.yaml")
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


@dataclass
class Record:
    """What the run's summary is written from, whatever happens: filled as the run goes."""

    summary: dict[str, Any]
    env: dict[str, Any]
    data: TaskData | None = None
    logger: Logger | None = None


def _run(spec: RunSpec, claimed: Claimed, hw: Hardware) -> float:
    env = {"choices": spec.choices, "versions": versions(), "git_commit": git_commit()}
    handler = open_run_dir(spec, claimed, env) if hw.dist.main else None
    record = Record({"status": "failed", "run_dir": str(spec.run_dir), **spec.choices}, env)
    try:
        trainer, test = assemble(spec, claimed, hw, record)
        with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
            record.summary |= fit_and_test(trainer, test, spec, hw)
        best = record.summary["val"]["best_acc"]
        return best if best is not None else float("nan")
    except BaseException as err:
        record.summary["status"], raised = failure(err)
        record.summary["error"] = str(raised) or type(raised).__name__
        if raised is not err:
            raise raised from err
        raise
    finally:
        record.summary |= run_facts(spec.typed, record.data, hw.device) | {
            "peak_memory_mb": peak_memory_mb(hw.device),
            "wall_seconds": time.time() - spec.started,
            "wandb_run_id": record.logger.wandb_id if record.logger else None,
            "versions": env["versions"], "git_commit": env["git_commit"],
            "processes": hw.dist.world,
        }  # fmt: skip
        finish(spec.run_dir, record, handler, hw.dist)


def assemble(spec: RunSpec, claimed: Claimed, hw: Hardware, record: Record) -> tuple[Trainer, list]:
    """The task, the model on the device, the episodes, the logger and the trainer (resumed
    when the folder held a run to continue)."""
    typed, dist, state = spec.typed, hw.dist, claimed.state
    seed_everything(typed.seed)
    data = record.data = claimed.data or load_task(typed.task)
    needed = ("train", "valid", "test") if trains(typed.train) else ("test",)
    check_feasible(data, typed.task, needed)
    log.info("task %s: %s", spec.choices.get("task"), data.summary())
    algo = build_model(typed, spec.resolved, data, record.summary).to(hw.device)
    dist.sync_module(algo)
    record.summary["precision"] = set_precision(hw, algo, record.summary["backbone_params"])
    record.summary["episode_batch"] = set_episode_batch(algo, typed.hardware.episode_batch)
    sampler, val, test = make_episodes(data, typed)
    record.logger = build_logger(typed, spec.run_dir, spec.choices, algo.family, spec.group,
                                 spec.resolved, state["wandb_run_id"] if state else None,
                                 dist.main)  # fmt: skip
    episodes = Episodes(sampler, val, contrastive_stage(data, typed, dist.rank))
    meta = {"config": spec.resolved, **record.env, "data": data.summary()}
    files = Checkpoints(spec.run_dir / "checkpoint.pt", spec.run_dir / STATE_FILE, meta)
    runtime = Runtime(hw.autocast, dist, typed.logger.progress)
    trainer = Trainer(algo, typed.train, episodes, record.logger, files, runtime)
    if state is not None and trainer.params:
        trainer.resume(state)
        record.summary["resumed_from_step"] = state["step"]
    return trainer, test


def fit_and_test(trainer: Trainer, test: list, spec: RunSpec, hw: Hardware) -> dict[str, Any]:
    """Meta-train, then test on the fixed test episodes: the summary's results."""
    fit = trainer.fit()
    progress = "test" if spec.typed.logger.progress and hw.dist.main else None
    result = evaluate(trainer.algo, test, hw.autocast, hw.dist, progress=progress)
    trainer.logger.log(result.metrics("test"), fit.steps_done)
    if hw.dist.main:
        write_json(spec.run_dir / "test_episodes.json", episode_record(result, test, spec.typed))
    log.info("test accuracy %.2f%% ± %.2f (95%% CI, %d episodes), macro-F1 %.2f%%",
             100 * result.acc, 100 * result.ci95, len(test), 100 * result.f1)  # fmt: skip
    return {
        "status": "completed",
        "test": {"acc": result.acc, "acc_ci95": result.ci95, "f1": result.f1,
                 "episodes": len(test)},
        "val": {"best_acc": fit.best_val_acc, "best_step": fit.best_step,
                "episodes": len(trainer.episodes.val)},
        "train": asdict(fit),
        "checkpoint": str(trainer.checkpoints.best) if trainer.progress.saved_checkpoint
        else None,
    }  # fmt: skip


def build_model(typed: MetarunConfig, resolved: dict, data: TaskData, summary: dict) -> Algorithm:
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


def set_precision(hw: Hardware, algo: Algorithm, params: int) -> dict[str, Any]:
    """`hardware.precision=auto` decided now that the backbone's size is known; under bf16 the
    frozen linear weights are stored in bf16 once (backbone/lowp.py). What summary.json says."""
    adapted = adapted_encoder_weights(algo)
    warning = choose_precision(hw, params, sorted(n for n in adapted if not is_lora(n)))
    if warning:
        log.warning("hardware.precision=bf16: %s; fp32 or auto avoids it", warning)
    stored = 0
    if hw.precision == "bf16":
        stored = store_frozen_in_bf16(algo.encoder.model, adapted)
        stored += output_layer_in_bf16(algo.encoder, adapted)
    return hw.facts() | {"frozen_weights_in_bf16": stored, "warning": warning}


def set_episode_batch(algo: Algorithm, size: int) -> dict[str, Any]:
    """hardware.episode_batch handed to the algorithm; what summary.json says of it."""
    algo.episode_batch = size
    batched = size > 1 and algo.batches_episodes
    if size > 1 and not batched:
        why = "side by side needs LoRA under the verbalizer head, algo/batched.py"
        log.info("hardware.episode_batch=%d: this algorithm adapts one episode at a time (%s)",
                 size, why)  # fmt: skip
    return {"requested": size, "side_by_side": batched}


def episode_record(result: EvalResult, test: list, typed: MetarunConfig) -> dict[str, Any]:
    """test_episodes.json: what paired comparisons read (metarun-report)."""
    return {
        "eval_seed": typed.task.eval_seed, "accuracy": result.accuracies.tolist(),
        "macro_f1": result.macro_f1s.tolist(), "classes": [list(ep.classes) for ep in test],
    }  # fmt: skip


def finish(run_dir: Path, record: Record, handler: logging.Handler | None, dist: Dist) -> None:
    """summary.json for every run, completed or not; W&B told whether it failed."""
    summary, logger = record.summary, record.logger
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
