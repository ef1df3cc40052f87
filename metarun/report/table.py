"""The report's tables: per group (task, way, shots), each method's accuracy over replicates
and its paired difference to the group's best method, Holm-corrected."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from metarun.report.runs import Run
from metarun.report.setting import Setting, backbone_label
from metarun.report.stats import Paired, holm, pair


@dataclass(frozen=True)
class Published:
    """A number from a paper, with what it was made with: never shown without its setting."""

    name: str
    acc: float
    backbone: str
    setting: Setting
    source: str


# The ProtAugment paper's own setup: BERT-base fine-tuned as a masked language model on each
# dataset's utterances (all classes' texts, test classes' included: unlabelled data), shared by
# the methods it reports; ProtAugment adds paraphrases of those utterances (augmentation).
MLM = "unlabelled (BERT-base fine-tuned as a masked LM on the dataset's utterances)"
PROTAUGMENT = "Dopierre et al., ACL 2021, Table 2"
PROTONET_SETTING = Setting(False, False, MLM)
PROTAUGMENT_SETTING = Setting(False, False, f"{MLM} + augmentation (paraphrases)")
# Published 5-way accuracies (%) on the BANKING77 class splits metarun reads, 600 episodes each,
# mean of 5 splits; shown only in their own task's table.
PUBLISHED: dict[tuple[str, int, int], list[Published]] = {
    ("banking77", 5, 1): [
        Published("ProtoNet (published)", 86.3, "bert-base (110M)", PROTONET_SETTING, PROTAUGMENT),
        Published("ProtAugment (published)", 89.6, "bert-base (110M)", PROTAUGMENT_SETTING,
                  PROTAUGMENT),
    ],
    ("banking77", 5, 5): [
        Published("ProtoNet (published)", 93.9, "bert-base (110M)", PROTONET_SETTING, PROTAUGMENT),
        Published("ProtAugment (published)", 94.7, "bert-base (110M)", PROTAUGMENT_SETTING,
                  PROTAUGMENT),
    ],
}  # fmt: skip
Row = tuple[str, str]  # (method, backbone)


@dataclass
class Line:
    row: Row
    runs: dict[tuple, Run]  # replicate (split, seed) -> run

    @property
    def mean(self) -> float:
        return 100 * statistics.mean(r.acc for r in self.runs.values())

    @property
    def ci(self) -> float:
        return 100 * statistics.mean(r.ci95 for r in self.runs.values())

    @property
    def spread(self) -> float:
        accs = [100 * r.acc for r in self.runs.values()]
        return statistics.stdev(accs) if len(accs) > 1 else float("nan")

    @property
    def label(self) -> str:
        return f"{self.row[0]} @ {self.row[1]}"

    @property
    def setting(self) -> str:
        settings = sorted({str(r.setting) for r in self.runs.values()})
        return settings[0] if len(settings) == 1 else "mixed: " + " / ".join(settings)

    @property
    def backbone(self) -> str:
        params = next((r.params for r in self.runs.values() if r.params), None)
        return backbone_label(self.row[1], params)


@dataclass
class Comparison:
    a: Line
    b: Line
    paired: Paired


@dataclass
class GroupReport:
    group: tuple[str, int, int]
    lines: list[Line]  # best first
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def title(self) -> str:
        task, way, shots = self.group
        return f"{task}, {way}-way {shots}-shot"


def build(runs: list[Run], pairs: list[tuple[str, str]] = ()) -> list[GroupReport]:
    """Groups with their lines and comparisons: each method against the best, and each pair
    asked for (by method or "method @ backbone"), with Holm's correction across the group."""
    by_group: dict[tuple, dict[Row, dict[tuple, Run]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        by_group[run.group][run.row][run.replicate] = run
    reports = []
    for group in sorted(by_group):
        lines = sorted((Line(row, reps) for row, reps in by_group[group].items()),
                       key=lambda line: -line.mean)  # fmt: skip
        report = GroupReport(group, lines)
        best = lines[0]
        wanted = [(line, best) for line in lines[1:]]
        for a_name, b_name in pairs:
            a, b = find(lines, a_name), find(lines, b_name)
            if a is not None and b is not None and a is not b and (a, b) not in wanted:
                wanted.append((a, b))
        report.comparisons = [Comparison(a, b, pair(a.runs, b.runs)) for a, b in wanted]
        adjusted = holm([c.paired.p for c in report.comparisons])
        for comparison, p in zip(report.comparisons, adjusted, strict=True):
            comparison.paired.p_holm = p
        reports.append(report)
    return reports


def find(lines: list[Line], name: str) -> Line | None:
    exact = [line for line in lines if name in (line.label, line.row[0])]
    return exact[0] if len(exact) == 1 else None


def fmt(x: float, digits: int = 2) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def p_text(p: float) -> str:
    return "–" if p != p else ("<0.001" if p < 0.001 else f"{p:.3f}")


def markdown(report: GroupReport) -> str:
    best = report.lines[0]
    vs_best = {c.a.row: c.paired for c in report.comparisons if c.b is best}
    out = [
        f"### {report.title}",
        "",
        "| method | backbone | setting | accuracy ± 95% CI | sd over replicates | replicates | "
        f"paired difference from the best ({best.row[0]}) [95% bootstrap] | p (Wilcoxon, Holm) | "
        "episodes paired |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for line in report.lines:
        p = vs_best.get(line.row)
        reps = ", ".join(f"{s}/{k}" for s, k in sorted(line.runs))
        if line is best:
            diff, pval, n = "best", "", ""
        elif p is None or p.episodes < 2:
            diff, pval, n = "not paired", "", "0"
        else:
            mark = " *" if p.significant else ""
            diff = f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}]{mark}"
            pval, n = p_text(p.p_holm), str(p.episodes)
        accuracy = f"**{line.mean:.2f}** ± {line.ci:.2f}"
        spread = fmt(line.spread)
        out.append(f"| {line.row[0]} | {line.backbone} | {line.setting} | {accuracy} | "
                   f"{spread} | {len(line.runs)} ({reps}) | {diff} | {pval} | {n} |")  # fmt: skip
    for pub in PUBLISHED.get(report.group, []):
        out.append(f"| {pub.name}, {pub.source} | {pub.backbone} | {pub.setting} | "
                   f"{pub.acc:.1f} | | 5 splits | | | |")  # fmt: skip
    extra = [c for c in report.comparisons if c.b is not best]
    if extra:
        out += ["", "| comparison | paired difference [95% bootstrap] | p (Holm) | episodes |",
                "|---|---:|---:|---:|"]  # fmt: skip
        for c in extra:
            p = c.paired
            out.append(f"| {c.a.label} − {c.b.label} | {p.mean:+.2f} [{p.low:+.2f}, "
                       f"{p.high:+.2f}]{' *' if p.significant else ''} | {p_text(p.p_holm)} | "
                       f"{p.episodes} |")  # fmt: skip
    notes = [f"- {c.a.label} and {c.b.label}, {u}" for c in report.comparisons
             for u in c.paired.unpaired]  # fmt: skip
    if notes:
        out += ["", "Not paired (their episodes differ, so no paired test is made):", *notes]
    return "\n".join(out)


LEGEND = (
    "Setting: inductive (each query classified from the support set alone) or transductive "
    "(also from the other queries of its episode); whether class names are used (as support "
    "examples, or scored by the method); extra data beyond the episodes' labelled examples. "
    "Compare numbers only within one setting. "
    "Accuracy: mean over replicates (class splits / seeds, listed as split/seed) of each run's "
    "test accuracy, ± the mean of the runs' 95% intervals. Paired difference: the mean "
    "per-episode accuracy difference on identical test episodes (same eval seed and classes), "
    "with a percentile bootstrap interval over episodes; p: two-sided Wilcoxon signed-rank "
    "test, Holm-corrected across the comparisons of the table; * marks p < 0.05."
)
