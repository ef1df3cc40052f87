"""The report's figures (PNG, matplotlib's file-only backend): accuracy by method and shots,
each replicate's accuracy, and validation curves from metrics.jsonl."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt

from metarun.report.table import GroupReport


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def accuracy_by_shots(reports: list[GroupReport], out: Path) -> list[Path]:
    """One figure per task and way: each method's accuracy (± its interval) against shots."""
    by_task: dict[tuple[str, int], list[GroupReport]] = defaultdict(list)
    for report in reports:
        by_task[report.group[:2]].append(report)
    paths = []
    for (task, way), group_reports in sorted(by_task.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for report in group_reports:
            for line in report.lines:
                series[line.label].append((report.group[2], line.mean, line.ci))
        for label, points in sorted(series.items()):
            points.sort()
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set(xlabel="shots", ylabel="test accuracy (%)", title=f"{task}, {way}-way")
        ax.set_xticks(sorted({r.group[2] for r in group_reports}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        paths.append(save(fig, out / f"accuracy_{slug(task)}_{way}way.png"))
    return paths


def replicates(report: GroupReport, out: Path) -> Path:
    """Each replicate's accuracy per method: how much a class split or seed moves a method."""
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(report.lines)))
    for y, line in enumerate(reversed(report.lines)):
        accs = [100 * run.acc for run in line.runs.values()]
        ax.scatter(accs, [y] * len(accs), alpha=0.7)
        ax.plot([line.mean, line.mean], [y - 0.3, y + 0.3], color="black")
    ax.set_yticks(range(len(report.lines)), [line.label for line in reversed(report.lines)],
                  fontsize=7)  # fmt: skip
    ax.set(xlabel="test accuracy (%) per replicate (bar: mean)", title=report.title)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, out / f"replicates_{slug(report.title)}.png")


def validation_curves(report: GroupReport, out: Path) -> Path | None:
    """val/acc against the outer step for every meta-trained run of the group."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for i, line in enumerate(report.lines):
        label: str | None = line.label  # on the method's first curve only
        for run in line.runs.values():
            points = val_points(run.folder / "metrics.jsonl")
            if not points:
                continue
            steps, accs = zip(*points, strict=True)
            ax.plot(steps, [100 * a for a in accs], marker=".", color=f"C{i % 10}", label=label)
            label, drawn = None, drawn + 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="outer step", ylabel="validation accuracy (%)", title=report.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save(fig, out / f"validation_{slug(report.title)}.png")


def val_points(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    points = []
    for text in path.read_text().splitlines():
        record = json.loads(text) if text.strip() else {}
        if record.get("val/acc") is not None:
            points.append((int(record["step"]), float(record["val/acc"])))
    return points


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
