"""Paired comparison of two methods on identical test episodes.

Every metarun run of one task, shape and class split is tested on the same fixed episodes
(`task.eval_seed`), so two methods can be compared episode by episode: the per-episode
difference removes the variance of episode difficulty, which dominates the unpaired intervals.
Episodes are paired only when they are provably the same (same eval seed and the same classes,
episode by episode); the first n episodes of a longer run pair with a run of n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from metarun.report.runs import Run

BOOTSTRAP = 2000  # resamples for the interval of the mean difference
ALPHA = 0.05


@dataclass
class Paired:
    """Method a minus method b, in accuracy points (0-100), over the episodes both ran."""

    diffs: np.ndarray
    replicates: list[tuple[str, int]]  # (split, seed) pairs that contributed
    unpaired: list[str] = field(default_factory=list)  # why a common replicate could not pair
    low: float = float("nan")
    high: float = float("nan")
    p: float = float("nan")
    p_holm: float = float("nan")

    @property
    def mean(self) -> float:
        return float(self.diffs.mean()) if len(self.diffs) else float("nan")

    @property
    def episodes(self) -> int:
        return len(self.diffs)

    @property
    def significant(self) -> bool:
        return bool(self.p_holm < ALPHA)


def same_episodes(a: Run, b: Run) -> tuple[int, str | None]:
    """How many leading test episodes of `a` and `b` are the same episodes, or why none."""
    if a.episodes is None or b.episodes is None or a.classes is None or b.classes is None:
        return 0, "no test_episodes.json"
    if a.eval_seed != b.eval_seed:
        return 0, f"eval_seed {a.eval_seed} vs {b.eval_seed}"
    n = min(len(a.classes), len(b.classes))
    if a.classes[:n] != b.classes[:n]:
        return 0, "different episode classes (another class split or data)"
    return n, None


def pair(a: dict[tuple, Run], b: dict[tuple, Run]) -> Paired:
    """Runs of two methods by replicate -> their paired per-episode differences."""
    diffs: list[np.ndarray] = []
    used: list[tuple[str, int]] = []
    unpaired: list[str] = []
    for rep in sorted(a.keys() & b.keys()):
        n, why = same_episodes(a[rep], b[rep])
        if why is not None:
            unpaired.append(f"split {rep[0]}, seed {rep[1]}: {why}")
            continue
        ea = np.asarray(a[rep].episodes[:n], dtype=float)  # type: ignore[index]
        eb = np.asarray(b[rep].episodes[:n], dtype=float)  # type: ignore[index]
        diffs.append(100 * (ea - eb))
        used.append(rep)
    result = Paired(np.concatenate(diffs) if diffs else np.zeros(0), used, unpaired)
    if result.episodes >= 2:
        result.low, result.high = bootstrap_interval(result.diffs)
        result.p = wilcoxon_p(result.diffs)
    return result


def bootstrap_interval(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean difference, resampling episodes."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(BOOTSTRAP, len(diffs)))
    means = diffs[idx].mean(axis=1)
    low, high = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; ties at zero (common: accuracies are discrete)
    are kept in the ranking (Pratt), and all-zero differences give p = 1."""
    if not np.any(diffs):
        return 1.0
    return float(stats.wilcoxon(diffs, zero_method="pratt").pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), NaN left as NaN."""
    index = [i for i, p in enumerate(pvalues) if p == p]
    order = sorted(index, key=lambda i: pvalues[i])
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
