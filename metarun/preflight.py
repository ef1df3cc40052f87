"""The checks a command passes before anything loads, and what a refused command leaves: a
sweep's job records why it never started in its own fresh folder (the sweep goes on); a single
command writes nothing, so the corrected command can use the same run_dir.

Imported by the CLI before the experiment's heavy modules: a mistake is answered without
importing torch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from omegaconf import DictConfig

from metarun.checks import check_config
from metarun.errors import MetarunError
from metarun.rundir.files import write_json
from metarun.rundir.folder import run_files


def check_before_loading(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], group: str | None
) -> None:
    """Keys, value ranges and the algorithm class, before any data, model or file. A sweep's
    job still records in its own fresh folder why it never started (the sweep goes on); a
    single command writes nothing, so the corrected command can use the same run_dir."""
    try:
        check_config(cfg)  # keys, choices, ranges: without importing torch
        from metarun.algo import algorithm_class, algorithm_config

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
