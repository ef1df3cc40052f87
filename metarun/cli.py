"""`metarun`: a Hydra app. Configs ship inside the package (metarun.conf), so the installed
command finds them from any directory; `--config-dir` adds a user's own groups."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from metarun.config import register_configs
from metarun.errors import MetarunError

log = logging.getLogger("metarun")


def _quiet_libraries() -> None:
    """Keep the user's terminal to metarun's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def _app(cfg: DictConfig) -> float:
    from metarun.experiment import run

    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    run_dir = Path(cfg.run_dir or cfg.train.resume or hc.runtime.output_dir)
    choices = {
        k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))
    }
    try:
        return run(cfg, run_dir, choices, group)
    except MetarunError as err:  # exit here: a re-raise would make Hydra print a second line
        job = f"[job {hc.job.num}: {','.join(hc.overrides.task)}] " if group else ""
        _fail(f"{job}{err}", getattr(err, "exit_code", 2))
    except OmegaConfBaseException as err:  # a resolver failed: e.g. a model package is missing
        _fail(one_line(err))


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"metarun: error: {message}", file=sys.stderr)
    sys.exit(code)


def _placement_overrides(argv: list[str]) -> list[str]:
    """Overrides metarun adds to the command line before Hydra reads it.

    - `train.resume=<dir>`: Hydra's own files and log for this invocation go to that folder
      too, so a resumed run stays one folder.
    - Under torchrun, processes other than rank 0 keep no Hydra folder or log file: rank 0
      owns the run folder (its path is broadcast to the others).
    """
    extra: list[str] = []
    given = {a.split("=", 1)[0].lstrip("+") for a in argv if "=" in a}
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("train.resume=")), None)
    if resume and "hydra.run.dir" not in given and not {"-m", "--multirun"} & set(argv):
        extra.append(f"hydra.run.dir={resume}")
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        scratch = Path(tempfile.gettempdir()) / f"metarun_rank{rank}_{os.getpid()}"
        extra += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null",
                  "hydra/job_logging=stdout"]  # fmt: skip
        logging.getLogger("metarun").setLevel(logging.WARNING)
    return extra


_NOISE = ("Config search path", "Set the environment variable HYDRA_FULL_ERROR")
_DETAIL = ("full_key:", "reference_type=", "object_type=", "provider=")


def one_line(err: BaseException) -> str:
    """Hydra's multi-line composition errors as one line; keeps the options it lists."""
    sentences: list[str] = []
    for source in (err, err.__cause__):
        for raw in str(source or "").splitlines():
            line = raw.strip().removeprefix("In 'config': ")
            if line.startswith(_NOISE):
                break
            if raw.startswith("\t") and sentences:  # an option under "Available options in ..."
                sentences[-1] += (" " if sentences[-1].endswith(":") else ", ") + line
            elif line and not line.startswith(_DETAIL) and line not in sentences:
                sentences.append(line)
    text = " ".join(s if s.endswith((".", ":")) else s + "." for s in sentences)
    if "Could not override" in text and {"-m", "--multirun"} & set(sys.argv):
        text += (
            " In a multirun, keys of a swept group are first checked against its default "
            "option: force them with ++key=value."
        )
    return text


def main() -> None:
    """Entry point; a mistake in the command line or config ends in one line and exit code 2."""
    register_configs()
    _quiet_libraries()
    sys.argv += _placement_overrides(sys.argv[1:])
    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full traces
        _app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    try:
        _app()
    except MetarunError as err:  # raised before any job starts
        _fail(str(err), getattr(err, "exit_code", 2))
    except (HydraException, OmegaConfBaseException) as err:
        _fail(one_line(err))


if __name__ == "__main__":
    main()
