"""Aggregate run folders into the results table of docs/RESULTS.md, beside published numbers.

    python scripts/report.py outputs/multirun/protaugment [more folders] --out docs/RESULTS.md

Every completed run (a folder with summary.json and config.yaml) below the given folders counts.
Runs group by task, shots, backbone and method (the algorithm and its number of meta-training
steps; train.steps=0 is the algorithm on the encoder as loaded, the frozen-encoder baseline).
The table gives the mean test accuracy over class splits, the mean of the splits' 95% intervals,
the spread between splits and the wall time. With --out only the block between the
`report:results` markers of that file is rewritten; without it the table is only printed, so
aggregating one's own runs never overwrites the repository's docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tables import replace_block  # noqa: E402

# Published 5-way accuracies (%) on the same BANKING77 splits, 600 episodes each, mean of 5 splits
# (Dopierre et al., ACL 2021, Table 2). Keys: (task, shots).
PUBLISHED: dict[tuple[str, int], dict[str, float]] = {
    ("banking77", 1): {"ProtoNet, BERT-base (published)": 86.3, "ProtAugment (published)": 89.6},
    ("banking77", 5): {"ProtoNet, BERT-base (published)": 93.9, "ProtAugment (published)": 94.7},
}


@dataclass
class Group:
    accs: dict[str, float] = field(default_factory=dict)  # split -> test accuracy
    cis: dict[str, float] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    episodes: set[int] = field(default_factory=set)


def method(summary: dict[str, Any], config: dict[str, Any]) -> str:
    steps = config["train"]["steps"]
    algo = summary.get("algo", config["algo"]["_target_"].rsplit(".", 1)[-1])
    return f"{algo}, no meta-training" if steps == 0 else f"{algo}, {steps} steps"


def collect(folders: list[Path]) -> dict[tuple, Group]:
    groups: dict[tuple, Group] = defaultdict(Group)
    for path in sorted(p for f in folders for p in f.rglob("summary.json")):
        summary = json.loads(path.read_text())
        config_path = path.parent / "config.yaml"
        if summary.get("status") != "completed" or not config_path.is_file():
            continue
        config = yaml.safe_load(config_path.read_text())
        task = summary.get("task", "?")
        key = (task, summary["shots"], summary.get("backbone", "?"), method(summary, config))
        group = groups[key]
        split = summary["seeds"]["split"]
        if split in group.accs:
            raise SystemExit(f"{path.parent}: a second run of {key} on split {split}; "
                             "report one multirun at a time or remove the duplicate")  # fmt: skip
        group.accs[split] = 100 * summary["test"]["acc"]
        group.cis[split] = 100 * summary["test"]["acc_ci95"]
        group.seconds.append(summary["wall_seconds"])
        group.episodes.add(summary["test"]["episodes"])
    return dict(groups)


def row(key: tuple, group: Group) -> str:
    task, shots, backbone, name = key
    accs = list(group.accs.values())
    spread = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    per_split = ", ".join(f"{s}: {a:.2f}" for s, a in sorted(group.accs.items()))
    minutes = sum(group.seconds) / 60
    return (f"| {task} | {shots} | {name} | {backbone} | **{statistics.mean(accs):.2f}** ± "
            f"{statistics.mean(group.cis.values()):.2f} | {spread:.2f} | {len(accs)} | "
            f"{per_split} | {minutes:.1f} min |")  # fmt: skip


def render(groups: dict[tuple, Group]) -> str:
    lines = [
        "| task | shots | method | backbone | accuracy (mean over splits) ± mean 95% CI | "
        "std over splits | splits | per split | wall time (all splits) |",
        "|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    tasks = sorted({(k[0], k[1]) for k in groups} | set(PUBLISHED))
    for task, shots in tasks:
        for key in sorted(k for k in groups if (k[0], k[1]) == (task, shots)):
            lines.append(row(key, groups[key]))
        for name, acc in PUBLISHED.get((task, shots), {}).items():
            lines.append(f"| {task} | {shots} | {name} | | {acc:.1f} | | 5 | | |")
    episodes = sorted({e for g in groups.values() for e in g.episodes})
    lines += ["", f"Test episodes per split: {', '.join(map(str, episodes)) or 'none'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="multirun or run folders")
    p.add_argument("--out", type=Path, help="markdown file whose report:results block to rewrite")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        p.error(f"no such folder: {', '.join(missing)}")
    groups = collect(args.folders)
    if not groups:
        p.error(f"no completed run (summary.json + config.yaml) under {args.folders}")
    table = render(groups)
    if args.out is not None:
        replace_block(args.out, "report:results", table)
    print(table)


if __name__ == "__main__":
    main()
