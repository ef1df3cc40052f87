"""Few-shot evaluation over fixed episodes: accuracy mean, 95% confidence interval, macro-F1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from metarun.algo import Algorithm
from metarun.algo.base import blocks
from metarun.distributed import Dist
from metarun.task import Episode


@dataclass
class EvalResult:
    accuracies: np.ndarray  # one per episode
    macro_f1s: np.ndarray

    @property
    def acc(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        """Half-width of the normal-approximation 95% interval of the mean accuracy."""
        n = len(self.accuracies)
        return float(1.96 * self.accuracies.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")

    @property
    def f1(self) -> float:
        return float(self.macro_f1s.mean())

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/acc": self.acc, f"{prefix}/acc_ci95": self.ci95, f"{prefix}/f1": self.f1}


def macro_f1(pred: np.ndarray, true: np.ndarray, way: int) -> float:
    scores = []
    for c in range(way):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(scores))


def evaluate(
    algo: Algorithm,
    episodes: Sequence[Episode],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    dist: Dist | None = None,
    progress: str | None = None,
) -> EvalResult:
    """Adapt on each support set, predict its query set; the model is left as it was found.

    With several processes each evaluates every world-th episode and the per-episode results
    are gathered back into episode order, so the result does not depend on the process count.
    `progress`: a progress bar with this label (600 adapted episodes can take minutes).
    Episodes go to `adapt_many` `algo.episode_batch` at a time; results are per episode.
    """
    dist = dist or Dist()
    was_training = algo.training
    algo.eval()
    mine = dist.shard(list(range(len(episodes))))
    results: dict[int, tuple[float, float]] = {}
    ids = torch.cat([episodes[i].text_ids() for i in mine]) if mine else torch.zeros(0).long()
    use_cache = algo.feature_cache and len(ids) > 0
    cache = algo.encoder.cached(ids) if use_cache else contextlib.nullcontext()
    bar = tqdm(total=len(mine), desc=progress, disable=progress is None, unit="episode",
               leave=False)  # fmt: skip
    with torch.no_grad(), autocast(), cache:
        for block in blocks(mine, algo.episode_batch, lambda i: episodes[i].way):
            eps = [episodes[i] for i in block]
            predict = algo.adapt_many([ep.support for ep in eps], eps[0].way)
            for i, ep, logits in zip(block, eps, predict([ep.query for ep in eps]), strict=True):
                pred = logits.argmax(-1).cpu().numpy()
                true = ep.query.labels.numpy()
                results[i] = (float((pred == true).mean()), macro_f1(pred, true, ep.way))
            bar.update(len(block))
    bar.close()
    algo.train(was_training)
    for part in dist.gather(results):  # every process's share (just ours with one process)
        results |= part
    ordered = [results[i] for i in range(len(episodes))]
    return EvalResult(np.array([a for a, _ in ordered]), np.array([f for _, f in ordered]))
