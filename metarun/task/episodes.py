"""N-way K-shot episodes as explicit data, drawn by samplers that own their generators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Examples:
    """Texts (as ids into the task's text table) with episode-local labels 0..way-1."""

    ids: torch.Tensor  # long [n]
    labels: torch.Tensor  # long [n]
    # The class name behind each label 0..way-1: what label-name methods (zero-shot, in-context
    # prompts) read; it carries no example, so using it is not peeking at the query.
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Episode:
    support: Examples
    query: Examples
    way: int
    shot: int
    classes: tuple[str, ...]  # class names, in label order

    def text_ids(self) -> torch.Tensor:
        return torch.cat([self.support.ids, self.query.ids])


def _examples(
    per_class: list[np.ndarray], classes: tuple[str, ...], rng: np.random.Generator
) -> Examples:
    ids = np.concatenate(per_class)
    labels = np.concatenate([np.full(len(p), c) for c, p in enumerate(per_class)])
    order = rng.permutation(len(ids))  # no algorithm may rely on examples being grouped by class
    return Examples(torch.from_numpy(ids[order]), torch.from_numpy(labels[order]), classes)


def with_names(support: Examples, name_ids: list[int]) -> Examples:
    """The support set plus one example per class: the text of its name, labelled as it."""
    ids = torch.cat([support.ids, torch.tensor(name_ids, dtype=support.ids.dtype)])
    labels = torch.cat([support.labels, torch.arange(len(name_ids), dtype=support.labels.dtype)])
    return Examples(ids, labels, support.classes)


class SeededSampler:
    """Draws from one split's classes with a generator of its own (never the global one),
    saved with the run and restored on resume. `name_ids`: task.names_as_examples, each
    class's name text joins what is drawn of it (label semantics)."""

    def __init__(
        self, classes: dict[str, np.ndarray], seed: Any, name_ids: dict[str, int] | None = None
    ) -> None:
        self.names = sorted(classes)
        self.pools = [classes[n] for n in self.names]
        self.rng = np.random.default_rng(seed)
        self.name_ids = name_ids

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class EpisodeSampler(SeededSampler):
    """N-way K-shot episodes with `queries` query texts per class."""

    def __init__(
        self, classes: dict[str, np.ndarray], way: int, shot: int, queries: int, seed: Any,
        name_ids: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(classes, seed, name_ids)
        self.way, self.shot, self.queries = way, shot, queries

    def sample(self) -> Episode:
        chosen = self.rng.choice(len(self.names), size=self.way, replace=False)
        support, query = [], []
        for c in chosen:
            picks = self.rng.choice(self.pools[c], size=self.shot + self.queries, replace=False)
            support.append(picks[: self.shot])
            query.append(picks[self.shot :])
        classes = tuple(self.names[c] for c in chosen)
        shots = _examples(support, classes, self.rng)
        if self.name_ids is not None:  # appended after the draws: the episodes stay the same
            shots = with_names(shots, [self.name_ids[c] for c in classes])
        return Episode(
            support=shots,
            query=_examples(query, classes, self.rng),
            way=self.way,
            shot=self.shot,
            classes=classes,
        )


# Streams of one seed: evaluation splits never share draws with each other or with training.
STREAM = {"train": 0, "valid": 1, "test": 2, "contrastive": 3}


def fixed_episodes(
    classes: dict[str, np.ndarray], way: int, shot: int, queries: int, n: int, seed: int,
    split: str, name_ids: dict[str, int] | None = None,
) -> list[Episode]:  # fmt: skip
    """The same `n` episodes for every run and algorithm given (classes, shape, seed, split)."""
    sampler = EpisodeSampler(classes, way, shot, queries, [seed, STREAM[split]], name_ids)
    return [sampler.sample() for _ in range(n)]
