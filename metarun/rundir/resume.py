"""Resuming a run folder: the checks that the resumed run is the run that stopped (same config
but for how long and where it runs, same data), and its metrics cut back to the resumed step.
What the trainer saves and restores is train/progress.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metarun.errors import MetarunError

# Keys a resumed run may change: how long it runs, how it reports, where it runs (prefixes:
# "run_dir" covers run_dir_mode).
MAY_CHANGE = ("train.steps", "train.resume", "train.patience", "logger", "hardware", "run_dir")


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def check_same_run(run_dir: Path, resolved: dict) -> None:
    """A resumed run must be the run that was stopped: same model, data, algorithm, seeds."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise MetarunError(f"train.resume={run_dir}: no config.yaml there; is it a run folder?")
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_path)))
    now = flatten(resolved)
    changed = sorted(
        k for k in saved.keys() | now.keys()
        if saved.get(k) != now.get(k) and not k.startswith(MAY_CHANGE)
    )  # fmt: skip
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise MetarunError(
            f"cannot resume {run_dir}: the config differs ({shown}); resume with the same "
            "overrides, or start a new run in another folder"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop what was logged after the resumed step (it will be logged again) and any test
    line of an earlier finish, so metrics.jsonl reads like one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("step", 0) <= step and not any(k.startswith("test/") for k in record):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def check_same_data(run_dir: Path, state: dict[str, Any], data: dict[str, Any]) -> None:
    """A resumed run must read the data it started on: the same config can point at a file
    that was replaced since. `data` and the state's "data" are TaskData.summary()s; a state
    saved before fingerprints existed is not checked."""
    saved = state.get("data") or {}
    if saved.get("split_fingerprint") in (None, data["split_fingerprint"]):
        return
    counts = [f"{split} {saved[split]['classes']} -> {data[split]['classes']} classes, "
              f"{saved[split]['texts']} -> {data[split]['texts']} texts"
              for split in ("train", "valid", "test")
              if split in saved and split in data and saved[split] != data[split]]  # fmt: skip
    if counts:
        what = "; ".join(counts)
    elif saved.get("fingerprint") != data["fingerprint"]:
        what = "the same counts, other texts or labels"
    else:
        what = "the same texts, other classes in the splits"
    raise MetarunError(
        f"cannot resume {run_dir}: the task's data changed since the run started ({what}); "
        "resume on the data it started with, or start afresh with run_dir_mode=overwrite"
    )
