"""Baselines every meta-learner must beat, behind the same interface and the same episodes.

- `FineTune`: transfer learning. A classifier over all meta-train classes trains the encoder on
  ordinary labelled examples; each test episode then fits a fresh head (optionally top layers).
- `FrozenLogReg`: a frozen encoder and an L2-regularised logistic regression per episode.
- `ZeroShot`: nearest label name; never looks at a support example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import inner_rate
from metarun.algo.base import (
    Algorithm,
    ManyPredictor,
    Predictor,
    freeze,
    fresh_module_groups,
    register_log_scalar,
    upcast,
)
from metarun.algo.heads import resolve_adapt
from metarun.algo.inner import build_inner_loop
from metarun.algo.logreg import fit_logistic
from metarun.backbone import Encoder
from metarun.config import (
    FineTuneConfig,
    FrozenConfig,
    InnerLoopFields,
    PromptFields,
    ZeroShotConfig,
)
from metarun.errors import MetarunError
from metarun.task import Episode, Examples, TaskData
from metarun.task.labels import episode_label_names


def per_episode_fit(cfg: FineTuneConfig) -> InnerLoopFields:
    """Fine-tuning's per-episode fit as an inner loop: it starts from a zero head, adapts
    `algo.adapt` (the head alone under a linear head) at `eval_lr` (0.5 for a zero head) and
    is never differentiated through (evaluation only)."""
    adapt = resolve_adapt(cfg.adapt, cfg.head, "head")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PromptFields)}
    return InnerLoopFields(
        **fields, head=cfg.head, adapt=adapt, top_k=cfg.top_k, adapt_layers=cfg.adapt_layers,
        cache_frozen_layers=cfg.cache_frozen_layers, inner_steps=0,
        eval_inner_steps=cfg.eval_steps, inner_lr=inner_rate(cfg.eval_lr, adapt, 0.5),
        head_init="zeros", inner_optimizer=cfg.inner_optimizer, lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
    )  # fmt: skip


class FineTune(Algorithm):
    family = "baseline"
    config = FineTuneConfig

    def __init__(self, encoder: Encoder, way: int, cfg: FineTuneConfig) -> None:
        super().__init__(encoder, way)
        self.inner = build_inner_loop(encoder, way, per_episode_fit(cfg))
        self.feature_cache = not self.inner.adapts_encoder
        self.head_lr = cfg.head_lr
        self.objective: nn.Module | None = None

    def prepare(self, data: TaskData) -> None:
        """The head's training objective: a classifier over every meta-train class under the
        linear head, prompt-based training on label names under the verbalizer."""
        self.inner.prepare(data)
        self.objective = self.inner.head.objective(self.encoder, data)

    def param_groups(self) -> list[dict]:
        return fresh_module_groups(self, [self.objective], self.head_lr)

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.objective is None:
            raise RuntimeError("FineTune.prepare(data) must run before training")
        return self.objective(self.encoder, episodes)

    def adapt(self, support: Examples, way: int) -> Predictor:
        return self.inner.run(self.encoder, support, way, self.inner.eval_steps, track=False,
                              create_graph=False).predict  # fmt: skip

    @property
    def batches_episodes(self) -> bool:
        return self.inner.can_batch(self.encoder)

    def adapt_many(self, supports: Sequence[Examples], way: int) -> ManyPredictor:
        """Test episodes side by side in one per-episode fit (algo/batched.py) where LoRA is
        what adapts; otherwise one at a time."""
        if len(supports) < 2 or not self.batches_episodes:
            return super().adapt_many(supports, way)
        return self.inner.run_many(self.encoder, supports, way, self.inner.eval_steps,
                                   track=False, create_graph=False).predict  # fmt: skip


class FrozenLogReg(Algorithm):
    """The BERT-Freeze baseline: nothing meta-trains; each episode fits its own classifier."""

    family = "baseline"
    config = FrozenConfig

    def __init__(self, encoder: Encoder, way: int, cfg: FrozenConfig) -> None:
        super().__init__(encoder, way)
        self.c, self.max_iter, self.normalize = cfg.c, cfg.max_iter, cfg.normalize
        freeze(encoder)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        feats = upcast(self.encoder(ids)).detach()
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def adapt(self, support: Examples, way: int) -> Predictor:
        x = self.features(support.ids)
        weight, bias = fit_logistic(x, support.labels.to(x.device), way, self.c, self.max_iter)
        return lambda query: self.features(query.ids) @ weight.T + bias


class ZeroShot(Algorithm):
    """Classify by cosine similarity between a query and each class's name (through a template).

    Training, when asked for, pulls texts towards their class names on meta-train classes.
    """

    family = "baseline"
    config = ZeroShotConfig

    def __init__(self, encoder: Encoder, way: int, cfg: ZeroShotConfig) -> None:
        super().__init__(encoder, way)
        if "{label}" not in cfg.template:
            raise MetarunError(f"algo.template={cfg.template!r} must contain {{label}}")
        self.template = cfg.template
        self.label_names: dict[str, str] = {}
        register_log_scalar(self, "log_temperature", cfg.temperature, cfg.learn_temperature)

    def prepare(self, data: TaskData) -> None:
        self.label_names = dict(data.label_names)

    def class_texts(self, classes: tuple[str, ...]) -> list[str]:
        names = episode_label_names(self.label_names, classes, "zero-shot classification")
        return [self.template.format(label=name) for name in names]

    def adapt(self, support: Examples, way: int) -> Predictor:
        # Only the class names of the support set are read, never its examples.
        names = F.normalize(upcast(self.encoder.encode_texts(self.class_texts(support.classes))),
                            dim=-1)  # fmt: skip

        def predict(query: Examples) -> torch.Tensor:
            q = F.normalize(upcast(self.encoder(query.ids)), dim=-1)
            return q @ names.T / self.log_temperature.exp()

        return predict
