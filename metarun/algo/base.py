"""The one interface every algorithm implements; the trainer and evaluator know nothing else.

- `meta_loss(episodes)` -> (scalar loss, metrics): what the outer optimiser minimises.
- `adapt(support, way)` -> predictor: a callable from query examples to logits [n, way].
- `adapt_many(supports, way)` -> a predictor of several query sets: adapts
  `hardware.episode_batch` episodes at once where the algorithm can (`batches_episodes`);
  by default one at a time, through `adapt`.
- `prepare(data)`: called once with the task before training, for algorithms that need more
  than episodes (label names, the list of meta-train classes). Default: nothing.

A subclass is built as `cls(encoder, way, cfg)`, `cfg` an instance of its `config` dataclass.

Adapted weights must be passed to the encoder as `params` (functional), never written into the
module: evaluation relies on the encoder's own weights being constant to reuse embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from metarun.backbone import Encoder, upcast
from metarun.task import Episode, Examples, TaskData

Predictor = Callable[[Examples], torch.Tensor]
ManyPredictor = Callable[[Sequence[Examples]], list[torch.Tensor]]
T = TypeVar("T")


class Algorithm(nn.Module):
    # Whether the algorithm reads the encoder only through its own (unadapted) embeddings,
    # `encoder(ids)`: then evaluation precomputes those of every test text once, and training
    # encodes an episode's support and query texts in one forward (fuller, better-packed
    # batches). Algorithms whose predictions come from adapted encoder weights set it False.
    feature_cache: bool = True
    # The dataclass of the algorithm's options (`algo.*`), which its constructor receives
    # built: metarun's live in config.py; a user's own algorithm declares its own beside it.
    config: type | None = None
    # The method family (metric, gradient, closed-form, model-based, baseline, in-context): the
    # W&B job type, so dashboards group runs by it without the logger naming any algorithm.
    family: str = "other"
    # hardware.episode_batch: how many episodes training and evaluation hand `adapt_many` at
    # once (set when a run is assembled). Per-episode results do not depend on it.
    episode_batch: int = 1

    def __init__(self, encoder: Encoder, way: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.way = way

    def prepare(self, data: TaskData) -> None:
        """Read what the algorithm needs from the whole task; runs before `.to(device)`."""

    def adapt(self, support: Examples, way: int) -> Predictor:
        raise NotImplementedError

    @property
    def batches_episodes(self) -> bool:
        """Whether `adapt_many` adapts several episodes in shared forwards."""
        return False

    def adapt_many(self, supports: Sequence[Examples], way: int) -> ManyPredictor:
        """Adapt to several support sets of `way` classes; the predictor takes their query sets
        in the same order. Default: each episode adapted (when its queries come) and predicted
        alone, holding one adapted state at a time."""

        def predict(queries: Sequence[Examples]) -> list[torch.Tensor]:
            pairs = zip(supports, queries, strict=True)
            return [self.adapt(support, way)(query) for support, query in pairs]

        return predict

    def param_groups(self) -> list[dict]:
        """What the outer optimiser updates, as torch optimizer groups (all trainable
        parameters at the trainer's rate unless an algorithm says otherwise)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The outer loss of one episode's query predictions; cross-entropy unless overridden."""
        return F.cross_entropy(upcast(logits), labels)

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        """Default: mean query loss after adapting on each episode's support set."""
        losses, correct, total = [], 0, 0
        size = self.episode_batch if self.batches_episodes else 1  # caches fill per episode
        for group in blocks(episodes, size, lambda ep: ep.way):
            ids = torch.cat([ep.text_ids() for ep in group])
            shared = self.encoder.cached(ids) if self.feature_cache else nullcontext()
            with shared:
                predict = self.adapt_many([ep.support for ep in group], group[0].way)
                outputs = predict([ep.query for ep in group])
            for ep, logits in zip(group, outputs, strict=True):
                labels = ep.query.labels.to(logits.device)
                losses.append(self.query_loss(logits, labels))
                correct += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
        loss = torch.stack(losses).mean()
        return loss, {"loss": float(loss.detach()), "acc": correct / total}


def blocks(items: Sequence[T], size: int, way: Callable[[T], int]) -> list[list[T]]:
    """Consecutive items (episodes, or their indices) in blocks of at most `size`, a block
    never mixing ways (`way` reads an item's)."""
    out: list[list[T]] = []
    for item in items:
        if out and len(out[-1]) < size and way(out[-1][0]) == way(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def freeze(module: nn.Module) -> None:
    """Baselines that never train their encoder say so by freezing it: the trainer then has
    nothing to optimise and goes straight to evaluation."""
    module.requires_grad_(False)


def fresh_module_groups(
    algo: Algorithm, fresh: Sequence[nn.Module | None], lr: float
) -> list[dict]:
    """Optimizer groups: modules built from scratch learn at `lr`, the rest at the trainer's
    rate (a pretrained encoder wants ~2e-5; a random head would barely move at that rate)."""
    ids = {id(p) for m in fresh if m is not None for p in m.parameters()}
    own = [p for p in algo.parameters() if p.requires_grad and id(p) in ids]
    rest = [p for p in algo.parameters() if p.requires_grad and id(p) not in ids]
    return [g for g in ({"params": rest}, {"params": own, "lr": lr}) if g["params"]]


def register_log_scalar(module: nn.Module, name: str, value: float, learn: bool) -> None:
    """A positive scalar (temperature, ridge penalty; checks.py keeps it positive) kept as its
    log: learned when asked (a parameter, optimised in log space so it stays positive), a fixed
    buffer otherwise."""
    log_value = torch.tensor(math.log(value))
    if learn:
        setattr(module, name, nn.Parameter(log_value))
    else:
        module.register_buffer(name, log_value)
