"""A trained run's best weights on its validation classes, under other test-time settings.

Test-time choices (inner steps, inner rate, the head's options) must be made on validation
classes, never on test numbers. This reads a finished run's folder, rebuilds its model with its
best weights (`init_from`), and evaluates the run's own fixed validation episodes once per
setting, in one process; the test classes are never read. Settings pair episode by episode
with the first one.

    python scripts/validate_run.py outputs/<run> --set algo.eval_steps=10,5,2,0 \
        --episodes 50 --out benchmarks/validate-steps.json

`--set key=a,b` may repeat: every combination runs. Anything after `--` is an override for every
setting (e.g. `-- hardware.threads=1`). `--reference "OVERRIDES"` first evaluates an untrained
model on the same episodes (the run's task, backbone and hardware, these overrides, no weights
of the run): what the trained settings are paired with, accuracy and speed, in one process.

    python scripts/validate_run.py outputs/<lora run> --set algo.eval_steps=10,1 \
        --reference "algo=maml algo.head=verbalizer hardware.precision=fp32"
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import cpu_name  # noqa: E402

from benchmarks.measure import compose_config  # noqa: E402
from metarun.checks import check_config  # noqa: E402
from metarun.errors import MetarunError  # noqa: E402
from metarun.experiment import build_model, set_precision  # noqa: E402
from metarun.hardware import seed_everything, setup_hardware  # noqa: E402
from metarun.report.stats import bootstrap_interval, wilcoxon_p  # noqa: E402
from metarun.task import TaskData, check_feasible, fixed_episodes, load_task  # noqa: E402
from metarun.train.evaluate import evaluate  # noqa: E402

# What an untrained reference keeps of the run's command: the data, the model, the machine
SHARED = ("task", "backbone", "hardware", "seed")
# What the run's own command set that must not carry over: its folder, its source weights, its
# training (the weights come from the run itself, and nothing trains here).
DROPPED = ("run_dir", "init_from", "train.", "+train.", "run_dir_mode")
# Every evaluation here trains nothing
NO_TRAINING = ["train.steps=0", "train.contrastive_steps=0"]


def run_overrides(run: Path) -> list[str]:
    """The command-line overrides the run was made with (its .hydra/overrides.yaml)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise MetarunError(f"{run} has no .hydra/overrides.yaml; give a metarun run folder")
    if not (run / "checkpoint.pt").is_file():
        raise MetarunError(f"{run} has no checkpoint.pt: no trained weights to validate")
    overrides = yaml.safe_load(path.read_text()) or []
    return [o for o in overrides if not o.split("=", 1)[0].startswith(DROPPED)]


def settings(sets: list[str]) -> list[list[str]]:
    """`key=a,b` options -> every combination, as override lists (the first is the reference)."""
    axes = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise MetarunError(f"--set {item!r}: write key=value[,value...]")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def reference_overrides(own: list[str], reference: str) -> list[str]:
    """The run's data, model and machine (of its overrides, `own`) with `reference`'s
    overrides, none of its weights."""
    shared = [o for o in own if o.lstrip("+").split(".", 1)[0].split("=")[0] in SHARED]
    return [*shared, *shlex.split(reference), *NO_TRAINING]


class Tasks:
    """Each distinct task config read once: settings usually share the run's task."""

    def __init__(self) -> None:
        self.loaded: dict[str, TaskData] = {}

    def get(self, resolved: dict[str, Any], typed: Any) -> TaskData:
        key = json.dumps(resolved["task"], sort_keys=True, default=str)
        if key not in self.loaded:
            self.loaded[key] = load_task(typed.task)
            check_feasible(self.loaded[key], typed.task, ("valid",))
        return self.loaded[key]


def evaluate_validation(
    overrides: list[str], setting: list[str], episodes: int, tasks: Tasks
) -> dict[str, Any]:
    """Compose `overrides` as `metarun` would, build the model (with init_from's weights when
    given) and evaluate the first `episodes` fixed validation episodes."""
    cfg = compose_config(overrides)
    check_config(cfg)
    typed = OmegaConf.to_object(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    hw = setup_hardware(typed.hardware)
    seed_everything(typed.seed)
    data = tasks.get(resolved, typed)
    summary: dict[str, Any] = {}
    algo = build_model(typed, resolved, data, summary)
    algo = algo.to(hw.device)
    set_precision(hw, algo, summary["backbone_params"])
    task = typed.task
    names = data.name_ids if task.names_as_examples else None
    val = fixed_episodes(data.splits["valid"], task.way, task.shots, task.queries, episodes,
                         task.eval_seed, "valid", names)  # fmt: skip
    start = time.perf_counter()
    result = evaluate(algo, val, hw.autocast)
    seconds = time.perf_counter() - start
    return {"setting": setting, "acc": 100 * result.acc, "ci95": 100 * result.ci95,
            "f1": 100 * result.f1, "seconds_per_episode": seconds / len(val),
            "precision": hw.precision, "accuracies": result.accuracies.tolist()}  # fmt: skip


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Setting a minus setting b, in points, over the same validation episodes."""
    diffs = 100 * (np.asarray(a["accuracies"]) - np.asarray(b["accuracies"]))
    low, high = bootstrap_interval(diffs) if len(diffs) > 1 else (float("nan"),) * 2
    p = wilcoxon_p(diffs) if len(diffs) > 1 else float("nan")
    return {"diff": float(diffs.mean()), "low": low, "high": high, "p": p}


def render(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    lines = [f"{payload['run']}: {payload['episodes']} validation episodes, {payload['cpu']}", "",
             "| setting | precision | accuracy ± 95% CI | vs the first [95% bootstrap] | "
             "s/episode | speed vs the first |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        name = " ".join(row["setting"]) or "as trained"
        d = row["paired"]
        vs = f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        speed = rows[0]["seconds_per_episode"] / row["seconds_per_episode"]
        lines.append(f"| {name} | {row['precision']} | {row['acc']:.2f} ± {row['ci95']:.2f} | "
                     f"{'reference' if row is rows[0] else vs} | "
                     f"{row['seconds_per_episode']:.2f} | {speed:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished metarun run folder")
    parser.add_argument("--set", action="append", default=[], help="key=a,b: settings to try")
    parser.add_argument("--episodes", type=int, default=0, help="0: the run's task.val_episodes")
    parser.add_argument("--out", type=Path, help="a JSON results file")
    parser.add_argument("--reference", help="overrides of an untrained model evaluated first")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    run = args.run.resolve()
    own = run_overrides(run)  # a run folder with weights, or one clear error before anything loads
    episodes = args.episodes or int(OmegaConf.load(run / "config.yaml").task.val_episodes)
    tasks, rows = Tasks(), []
    if args.reference is not None:
        overrides = [*reference_overrides(own, args.reference), *extra]
        rows.append(evaluate_validation(overrides, ["untrained:", args.reference], episodes,
                                        tasks))  # fmt: skip
    for setting in settings(args.set):
        overrides = [*own, *extra, *setting, f"init_from={run}", *NO_TRAINING]
        rows.append(evaluate_validation(overrides, setting, episodes, tasks))
        print(f"[validate] {' '.join(setting) or 'as trained'}: {rows[-1]['acc']:.2f}", flush=True)
    for row in rows:
        row["paired"] = paired(row, rows[0])
    payload = {"run": str(run), "episodes": episodes, "extra": extra, "cpu": cpu_name(),
               "reference": args.reference,
               "torch": torch.__version__, "rows": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(payload, indent=1))
    print(render(payload))


if __name__ == "__main__":
    try:
        main()
    except MetarunError as err:
        sys.exit(f"validate_run: {err}")
