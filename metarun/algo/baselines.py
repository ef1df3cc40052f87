"""Baselines every meta-learner must beat, behind the same interface and the same episodes.

- `FineTune`: transfer learning. A classifier over all meta-train classes trains the encoder on
  ordinary labelled examples; each test episode then fits a fresh head (optionally top layers).
- `FrozenLogReg`: a frozen encoder and an L2-regularised logistic regression per episode.
- `ZeroShot`: nearest label name; never looks at a support example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.base import (
    Algorithm,
    Predictor,
    freeze,
    fresh_module_groups,
    register_log_scalar,
    upcast,
)
from metarun.algo.inner import build_inner_loop
from metarun.algo.logreg import fit_logistic
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Episode, Examples, TaskData
from metarun.task.data import episode_label_names


class FineTune(Algorithm):
    family = "baseline"

    def __init__(
        self, encoder: Encoder, way: int, head: str, adapt: str, top_k: int, lora_r: int,
        lora_alpha: int, eval_steps: int, eval_lr: float | None, inner_optimizer: str,
        head_lr: float,
        instruction: str, template: str, separator: str, score: str,
    ) -> None:  # fmt: skip
        super().__init__(encoder, way)
        if adapt not in ("auto", "head", "top_k", "bias", "all", "lora"):
            raise MetarunError(
                f"algo.adapt={adapt}; fine-tuning adapts head, top_k, bias, all or lora"
            )
        # The per-episode fit is an inner loop that starts from a zero head and is never
        # differentiated through (evaluation only).
        self.inner = build_inner_loop(
            encoder, way, adapt, top_k, 0, eval_steps, eval_lr, False, "zeros",
            inner_optimizer, (lora_r, lora_alpha), head,
            (instruction, template, separator, score), linear_default="head", default_lr=0.5,
        )  # fmt: skip
        self.feature_cache = not self.inner.adapts_encoder
        self.head_lr = head_lr
        self.class_index: dict[str, int] = {}
        self.classifier: nn.Linear | None = None

    def prepare(self, data: TaskData) -> None:
        """One output per meta-train class: the classifier of ordinary supervised training (the
        verbalizer head needs none: the decoder scores label names)."""
        self.inner.prepare(data)
        if self.inner.verbalizer is None:
            self.class_index = {c: i for i, c in enumerate(sorted(data.splits["train"]))}
            self.classifier = nn.Linear(self.encoder.dim, len(self.class_index))

    def param_groups(self) -> list[dict]:
        return fresh_module_groups(self, [self.classifier], self.head_lr)

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over all meta-train classes on the episodes' examples, pooled into one
        batch: the episode structure is only a source of labelled texts here. Under the
        verbalizer head: cross-entropy over each episode's label names, the decoder unadapted
        (prompt-based fine-tuning)."""
        verbalizer = self.inner.verbalizer
        if verbalizer is not None:
            losses, correct, total = [], 0, 0
            for ep in episodes:
                for part in (ep.support, ep.query):
                    logits = verbalizer(part)
                    labels = part.labels.to(logits.device)
                    losses.append(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(-1) == labels).sum())
                    total += len(labels)
            loss = torch.stack(losses).sum() / total
            return loss, {"loss": float(loss.detach()), "acc": correct / total}
        if self.classifier is None:
            raise RuntimeError("FineTune.prepare(data) must run before training")
        ids, labels = [], []
        for ep in episodes:
            for part in (ep.support, ep.query):
                ids.append(part.ids)
                labels.append(torch.tensor([self.class_index[ep.classes[i]] for i in part.labels]))
        logits = self.classifier(upcast(self.encoder(torch.cat(ids))))
        target = torch.cat(labels).to(logits.device)
        loss = F.cross_entropy(logits, target)
        acc = float((logits.argmax(-1) == target).float().mean())
        return loss, {"loss": float(loss.detach()), "acc": acc}

    def adapt(self, support: Examples, way: int) -> Predictor:
        return self.inner.run(self.encoder, support, way, self.inner.eval_steps, track=False,
                              create_graph=False).predict  # fmt: skip


class FrozenLogReg(Algorithm):
    """The BERT-Freeze baseline: nothing meta-trains; each episode fits its own classifier."""

    family = "baseline"

    def __init__(self, encoder: Encoder, way: int, c: float, max_iter: int, normalize: bool):
        super().__init__(encoder, way)
        if c <= 0 or max_iter < 1:
            raise MetarunError(f"algo.c={c} must be positive and algo.max_iter={max_iter} >= 1")
        self.c, self.max_iter, self.normalize = c, max_iter, normalize
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

    def __init__(
        self, encoder: Encoder, way: int, template: str, temperature: float,
        learn_temperature: bool,
    ) -> None:  # fmt: skip
        super().__init__(encoder, way)
        if "{label}" not in template:
            raise MetarunError(f"algo.template={template!r} must contain {{label}}")
        self.template = template
        self.label_names: dict[str, str] = {}
        register_log_scalar(self, "log_temperature", temperature, learn_temperature, "temperature")

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
