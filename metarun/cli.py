"""`metarun`: a Hydra app. Configs ship inside the package (metarun.conf), so the installed
command finds them from any directory; `--config-dir` adds a user's own groups."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from metarun.config import register_configs
from metarun.errors import MetarunError, RunInterrupted
from metarun.hydra_errors import one_line
from metarun.preflight import check_before_loading
from metarun.rundir.folder import os_error_message

log = logging.getLogger("metarun")


def _quiet_libraries() -> None:
    """Keep the user's terminal to metarun's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


FAILED: list[str] = []  # a multirun's failed jobs, listed when the sweep ends


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def _app(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    run_dir = Path(cfg.run_dir or cfg.train.resume or hc.runtime.output_dir)
    choices = {
        k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))
    }
    job = f"[job {hc.job.num}: {','.join(hc.overrides.task)}] " if group else ""
    try:
        check_before_loading(cfg, run_dir, choices, group)  # a mistake: answered before torch loads
        _quiet_libraries()
        from metarun.experiment import run

        return run(cfg, run_dir, choices, group)
    except RunInterrupted as err:  # Ctrl-C stops a sweep too
        _fail(f"{job}{err}", err.exit_code)
    except (MetarunError, OmegaConfBaseException) as err:
        message = str(err) if isinstance(err, MetarunError) else one_line(err)
        if group is None:  # exit here: a re-raise would make Hydra print a second line
            _fail(message)
        print(f"metarun: error: {job}{message}", file=sys.stderr)
    except Exception as err:  # a bug: one job's traceback must not end the sweep
        if group is None:
            raise
        print(f"metarun: error: {job}{type(err).__name__}: {err} (traceback in "
              f"{run_dir / 'metarun.log'})", file=sys.stderr)  # fmt: skip
    FAILED.append(f"job {hc.job.num} ({run_dir})")
    return float("nan")


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"metarun: error: {message}", file=sys.stderr)
    sys.exit(code)


def _placement_overrides(argv: list[str]) -> list[str]:
    """Overrides metarun adds to the command line before Hydra reads it.

    - `run_dir=<dir>` or `train.resume=<dir>`: that folder is Hydra's output folder too, so a
      run stays one folder.
    - Under torchrun, processes other than rank 0 keep no Hydra folder or log file: rank 0
      owns the run folder (its path is broadcast to the others).
    """
    extra: list[str] = []
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    multirun = bool({"-m", "--multirun"} & set(argv))
    folder = next((a.split("=", 1)[1] for a in argv
                   if a.startswith(("run_dir=", "train.resume="))), None)  # fmt: skip
    if folder and "hydra.run.dir" not in given and not multirun:
        extra.append(f"hydra.run.dir={folder}")
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        scratch = Path(tempfile.gettempdir()) / f"metarun_rank{rank}_{os.getpid()}"
        extra += [f"hydra.run.dir={scratch}", "hydra/job_logging=stdout"]
        logging.getLogger("metarun").setLevel(logging.WARNING)
    return extra


# Keys whose values are paths. A folder Hydra itself made can hold `=` and `,` (a multirun
# job's folder, `0_+experiment=recommended,task.shots=1`), and a path can hold letters outside
# ASCII; Hydra's grammar reads both as syntax, so such values are quoted for it.
PATH_KEYS = ("run_dir", "train.resume", "init_from", "task.path", "task.data_dir",
             "backbone.path")  # fmt: skip
FOLDER_KEYS = ("run_dir", "train.resume", "init_from")  # a run's folder, never a file
PLAIN = re.compile(r"^[A-Za-z0-9_./\\\-+~@%]*$")  # what Hydra reads as a plain string


def quote_paths(argv: list[str]) -> list[str]:
    """Path values an unquoted override cannot carry, quoted: an existing path (a sweep over
    two folders is `a,b`, which is not one), or one with letters outside ASCII."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        if eq and bare in PATH_KEYS and value and value[0] not in "'\"" and not PLAIN.match(value):
            quote = next((q for q in "'\"" if q not in value), None)
            if quote and (Path(value).expanduser().exists() or not value.isascii()):
                arg = f"{key}={quote}{value}{quote}"
        out.append(arg)
    return out


def check_placement(argv: list[str]) -> None:
    """Mistakes in where a run goes, refused before Hydra makes any folder: a folder key
    naming a file, and one folder given to a sweep's many jobs."""
    multirun = bool({"-m", "--multirun"} & set(argv))
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in FOLDER_KEYS or value in ("", "null"):
            continue
        path = Path(value.strip("'\"")).expanduser()
        if path.is_file():
            raise MetarunError(f"{key}={value} is a file; {key} names a run's folder")
        if multirun and key != "init_from":
            raise MetarunError(
                f"{key}={value} names one folder, but -m runs a sweep whose jobs each need their "
                "own: drop it (jobs go under hydra.sweep.dir, which you may set), or run a "
                "single job without -m"
            )


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """`extra` beside the command's own overrides: argparse reads overrides as one run of
    positional arguments, so `task=x --cfg job y=1` would be refused."""
    given = [i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")]
    at = given[-1] + 1 if given else len(argv)
    return argv[:at] + extra + argv[at:]


HELP = """metarun {version}: meta-learning experiments on transformer language models.

Meta-trains an algorithm on N-way K-shot episodes of a task's training classes, selects on
validation classes, and tests on fixed episodes of held-out classes (mean accuracy with its
95% interval). Every run leaves a folder: config, metrics, checkpoints, summary.

Usage: metarun [group=option ...] [key=value ...] [-m (a sweep over comma-separated values)]

Config groups and their options (defaults marked *):
{groups}

Common keys: task.way, task.shots, task.queries, task.path, task.data_dir, train.steps,
train.lr, train.meta_batch_size, seed, run_dir, init_from, logger.wandb (see
`metarun --cfg job` for every key of the composed config).

Examples:
  metarun                                                 # ProtoNet on MiniLM, ICD-10 5-way 1-shot
  metarun algo=maml backbone=minilm task=banking77 task.data_dir=../shared/data/banking77
  metarun +experiment=recommended task=local task.path=my.csv task.shots=5   # the best recipe
  metarun algo=maml algo.head=verbalizer backbone=smollm2 task.shots=1   # a decoder LLM
  metarun -m algo=protonet,maml,anil task.shots=1,5 seed=0,1,2            # a sweep
  metarun init_from=outputs/runs/<run> train.steps=0 task=clinc150        # reuse a trained run
  metarun-report outputs/multirun/<sweep>                 # tables, paired tests, plots
  metarun-predict outputs/runs/<run> --support few.csv --queries new.csv  # label new texts

More: --cfg job (the composed config), --config-dir DIR (your own config groups),
--hydra-help (Hydra's own options), --version."""


def help_text() -> str:
    """metarun's --help: its groups and options read from the shipped configs."""
    from importlib import resources

    conf = resources.files("metarun.conf")
    defaults = re.findall(r"^  - (\w+): (\S+)$", conf.joinpath("config.yaml").read_text(), re.M)
    chosen = dict(defaults)
    lines = []
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.name.removesuffix(".yaml") for f in conf.joinpath(group).iterdir()
                         if f.name.endswith(".yaml"))  # fmt: skip
        marked = [f"{o}*" if chosen.get(group) == o else o for o in options]
        lines.append(textwrap.fill(", ".join(marked), 96, initial_indent=f"  {group:<11}",
                                   subsequent_indent=" " * 13))  # fmt: skip
    return HELP.format(version=metadata.version("metarun"), groups="\n".join(lines))


def main() -> None:
    """Entry point; a mistake in the command line or config ends in one line and exit code 2."""
    args = sys.argv[1:]
    if "--version" in args or "-V" in args:
        print(f"metarun {metadata.version('metarun')}")
        return
    if "--help" in args or "-h" in args:
        print(help_text())
        return
    register_configs()
    try:
        check_placement(args)
    except MetarunError as err:
        _fail(str(err))
    args = quote_paths(args)
    sys.argv[1:] = with_overrides(args, _placement_overrides(args))
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
    except OSError as err:  # Hydra could not create the output folder
        message = os_error_message(err)
        if message is None:
            raise
        _fail(message)
    if FAILED:
        _fail(f"{len(FAILED)} job(s) of the sweep failed (each one's summary.json and "
              f"metarun.log say why): {'; '.join(FAILED)}", 1)  # fmt: skip


if __name__ == "__main__":
    main()
