"""`metarun`: a Hydra app. Configs ship inside the package (metarun.conf), so the installed
command finds them from any directory; `--config-dir` adds a user's own groups."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun.config import register_configs
from metarun.errors import MetarunError

log = logging.getLogger("metarun")


def _quiet_libraries() -> None:
    """Keep the user's terminal to metarun's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def _app(cfg: DictConfig) -> float:
    from metarun.experiment import run

    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    run_dir = Path(cfg.run_dir or hc.runtime.output_dir)
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))}
    try:
        return run(cfg, run_dir, choices, group)
    except MetarunError as err:
        print(f"metarun: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    _quiet_libraries()
    _app()


if __name__ == "__main__":
    main()
