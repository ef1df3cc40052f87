"""Finished run folders as rows of a comparison: what was run (task, shape, backbone, method),
which replicate it is (class split, seed), and its per-episode test accuracies.

A method is the algorithm option, the overrides of its command that change what runs
(`algo.*`, `backbone.*`, `train.*`) and its number of meta-training steps: `maml` with the
verbalizer head and `maml` with a linear head are two methods, and a seed sweep is replicates
of one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metarun.report.setting import INDUCTIVE, Setting, run_setting

log = logging.getLogger(__name__)
# Options that name where data lives rather than what it is: the task is named by its data.
DATA_CHOICES = ("local",)


@dataclass
class Run:
    folder: Path
    task: str  # the data's name: banking77, clinc150, icd10, or a local file's / folder's name
    way: int
    shots: int
    backbone: str
    method: str
    split: str
    seed: int
    eval_seed: int
    acc: float  # test accuracy, 0-1
    ci95: float
    seconds: float
    episodes: list[float] | None  # per-episode test accuracy, when test_episodes.json exists
    classes: list[list[str]] | None  # each test episode's classes: what makes episodes equal
    data_id: str = ""  # the content fingerprint of the data read ("" for runs made before it)
    setting: Setting = INDUCTIVE  # inductive or not, names or not, extra data
    params: float | None = None  # the backbone's parameters, when the summary records them

    @property
    def group(self) -> tuple[str, int, int]:
        """Runs of one group answer one question: same data, way and shots."""
        return (self.task, self.way, self.shots)

    @property
    def row(self) -> tuple[str, str]:
        return (self.method, self.backbone)

    @property
    def replicate(self) -> tuple[str, int]:
        return (self.split, self.seed)


def task_name(summary: dict[str, Any], config: dict[str, Any]) -> str:
    choice = str(summary.get("task", "?"))
    if choice not in DATA_CHOICES:
        return choice
    task = config.get("task", {})
    where = task.get("data_dir") or task.get("path") or choice
    path = Path(str(where))
    return path.stem if path.suffix else path.name


# Overrides that say where a run's data lives, which group and replicate it is, or how it was
# kept, not what was run: they never split methods. Any other override does (algo.*,
# backbone.*, train.*, and task options such as task.names_as_examples).
BOOKKEEPING_GROUPS = ("seed", "run_dir", "run_dir_mode", "logger", "hardware", "hydra",
                      "experiment")  # fmt: skip
BOOKKEEPING_KEYS = ("train.steps", "train.resume", "train.save_checkpoint",
                    "train.checkpoint_interval")  # fmt: skip
TASK_KEYS = ("way", "shots", "queries", "split", "data_dir", "path", "hub_config", "source",
             "text_column", "label_column", "encoding", "on_invalid_rows", "class_split",
             "split_seed", "eval_seed", "val_episodes", "test_episodes")  # fmt: skip


def is_bookkeeping(key: str) -> bool:
    if key.startswith("task."):
        return key.removeprefix("task.") in TASK_KEYS
    return key.split(".")[0] in BOOKKEEPING_GROUPS or key in BOOKKEEPING_KEYS


def protocol_only(experiment: str) -> bool:
    """Whether a shipped experiment only fixes a protocol (data, episode shape, test episodes:
    protaugment), so its runs are any method's; one that sets algorithm or training keys
    (recommended), or one metarun does not ship, is part of the method."""
    path = resources.files("metarun.conf") / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        return False
    raw = yaml.safe_load(path.read_text()) or {}
    for entry in raw.pop("defaults", []):
        groups = entry if isinstance(entry, dict) else {str(entry): None}
        if any(not str(g).removeprefix("override ").lstrip("/").startswith("task") for g in groups):
            return False
    keys = [f"{top}.{key}" for top, node in raw.items() if isinstance(node, dict) for key in node]
    return all(is_bookkeeping(k) for k in keys) and all(isinstance(n, dict) for n in raw.values())


def experiment_options(value: str) -> list[str]:
    """`experiment=[protaugment,recommended]` -> ["experiment=recommended"]."""
    names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
    return [f"experiment={n}" for n in names if not protocol_only(n)]


def method_options(folder: Path) -> list[str]:
    """The command's overrides that change what is run, from .hydra/overrides.yaml; group
    choices (algo=, backbone=) and bookkeeping excluded; experiments that set algorithm or
    training keys are named."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    options = []
    for override in yaml.safe_load(path.read_text()) or []:
        text = str(override).lstrip("+~")
        key, _, value = text.partition("=")
        if key == "experiment":
            options += experiment_options(value)
        elif "." in key and not is_bookkeeping(key):
            options.append(text.removeprefix("algo."))
    return sorted(options)


def source_name(source: str, depth: int) -> str:
    """What a run's init_from names in its method: the source's own method and task, so the
    evaluations of one method's runs on several splits are replicates of one row (the source
    folders differ by split); the folder's name when the source is gone or unreadable."""
    folder = Path(source)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return folder.name
    if depth > 3 or not isinstance(summary, dict) or not isinstance(config, dict):
        return folder.name
    method = method_name(summary, config, folder, depth + 1)
    return f"({method}, on {task_name(summary, config)})"


def method_name(
    summary: dict[str, Any], config: dict[str, Any], folder: Path, depth: int = 0
) -> str:
    algo = str(summary.get("algo") or config["algo"]["_target_"].rsplit(".", 1)[-1])
    steps = int(summary.get("train", {}).get("steps_done") or 0)  # 0 when nothing could train
    source = (summary.get("init_from") or {}).get("run")
    start = [f"from {source_name(source, depth)}"] if source else []  # trained elsewhere
    trained = ("no further training" if source else "no meta-training") if steps == 0 else (
        f"{steps} steps")  # fmt: skip
    return ", ".join([algo, *method_options(folder), *start, trained])


def read_run(summary_path: Path) -> Run | None:
    """A completed run, or None (failed, interrupted, or not a metarun folder)."""
    folder = summary_path.parent
    summary = json.loads(summary_path.read_text())
    config_path = folder / "config.yaml"
    if summary.get("status") != "completed" or not config_path.is_file():
        return None
    config = yaml.safe_load(config_path.read_text())
    seeds = summary.get("seeds", {})
    episodes = classes = None
    eval_seed = int(seeds.get("eval_seed", config.get("task", {}).get("eval_seed", -1)))
    per_episode = folder / "test_episodes.json"
    if per_episode.is_file():
        record = json.loads(per_episode.read_text())
        episodes, classes = record["accuracy"], record.get("classes")
        eval_seed = int(record.get("eval_seed", eval_seed))
    return Run(
        folder=folder, task=task_name(summary, config), way=int(summary.get("way", 0)),
        shots=int(summary["shots"]), backbone=str(summary.get("backbone", "?")),
        method=method_name(summary, config, folder), split=str(seeds.get("split", "?")),
        seed=int(seeds.get("seed", config.get("seed", 0))), eval_seed=eval_seed,
        acc=float(summary["test"]["acc"]), ci95=float(summary["test"]["acc_ci95"] or 0.0),
        seconds=float(summary.get("wall_seconds", 0.0)), episodes=episodes, classes=classes,
        data_id=str((summary.get("data") or {}).get("fingerprint") or ""),
        setting=run_setting(config), params=summary.get("backbone_params"),
    )  # fmt: skip


def collect(folders: list[Path]) -> tuple[list[Run], list[str]]:
    """Every completed run below `folders`, and notes on what was left out. Two runs of one
    method on one replicate (a re-run) count once: the newer."""
    chosen: dict[tuple, tuple[float, Run]] = {}
    notes: list[str] = []
    runs = []
    for path in summary_files(folders):
        try:
            run = read_run(path)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            # a truncated summary.json (a run killed while writing it, a full disk) or a
            # foreign file: the other runs are still reported
            note = f"skipped {path.parent}: unreadable ({type(err).__name__}: {err})"
            log.warning(note)
            notes.append(note)
            continue
        if run is not None:
            runs.append((path, run))
    for path, run in name_datasets(runs):
        key = (run.group, run.row, run.replicate)
        mtime = path.stat().st_mtime
        if key in chosen:
            older = min(chosen[key], (mtime, run), key=lambda t: t[0])[1]
            notes.append(str(older.folder))
            if mtime < chosen[key][0]:
                continue
        chosen[key] = (mtime, run)
    repeats = [n for n in notes if not n.startswith("skipped ")]
    notes = [n for n in notes if n.startswith("skipped ")]
    if repeats:
        notes.append(
            f"{len(repeats)} run(s) repeat a method and replicate of another run; the newer "
            f"counts, these do not: {', '.join(repeats[:3])}{', ...' if len(repeats) > 3 else ''}"
        )
    return [run for _, run in chosen.values()], notes


def summary_files(folders: list[Path]) -> list[Path]:
    """Every summary.json below `folders`, following symbolic links (a folder of links to the
    runs one wants side by side is a common way to pick them), each real file once. A real
    folder is walked once, whether a link leads back up the tree or two arguments overlap."""
    found: set[Path] = set()
    seen: set[Path] = set()
    for folder in folders:
        for root, dirs, files in os.walk(folder, followlinks=True):
            real = Path(root).resolve()
            if real in seen:
                dirs.clear()
                continue
            seen.add(real)
            if "summary.json" in files:
                found.add(real / "summary.json")
    return sorted(found)


def name_datasets(runs: list[tuple[Path, Run]]) -> list[tuple[Path, Run]]:
    """Runs whose data share a name (two files called data.jsonl) but not their content are
    different tasks: each content gets its fingerprint after the name, so they are never
    averaged or paired. Runs made before fingerprints join the only content there is."""
    ids: dict[str, set[str]] = {}
    for _, run in runs:
        ids.setdefault(run.task, set()).add(run.data_id)
    out = []
    for path, run in runs:
        known = ids[run.task] - {""}
        if len(known) > 1:
            suffix = run.data_id[:8] if run.data_id else "no fingerprint"
            run = dataclasses.replace(run, task=f"{run.task} [{suffix}]")
        out.append((path, run))
    return out
