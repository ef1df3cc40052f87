"""Supervised contrastive pre-training on the meta-train classes (`train.contrastive_steps`).

Before episodic training, the encoder learns from ordinary labelled batches of the meta-train
classes: texts of a class are pulled together and pushed from every other class in the batch
(SupCon, Khosla et al., 2020; the idea behind CPFT and IntentBERT for intent detection). A
5-way episode sees 5 classes a step; a contrastive batch sees many, so the encoder learns the
domain's distinctions from far more pairs per step. The stage is the trainer's, not an
algorithm's: it reads only the encoder, and validation episodes pick its best step as they do
for meta-training steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metarun.algo.base import upcast
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Examples
from metarun.task.episodes import SeededSampler


class ClassBatchSampler(SeededSampler):
    """Batches of `classes` classes x `per_class` texts from one split. With `name_ids`, each
    class's name text joins the batch as one more text of that class (the names the episodes'
    support sets get)."""

    def __init__(
        self, classes: dict[str, np.ndarray], n_classes: int, per_class: int, seed: Any,
        name_ids: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        if len(classes) < 2:
            raise MetarunError("train.contrastive_steps needs at least 2 meta-train classes")
        super().__init__(classes, seed, name_ids)
        self.n_classes = min(n_classes, len(self.names))  # all classes when fewer
        self.per_class = per_class

    def sample(self) -> Examples:
        chosen = self.rng.choice(len(self.names), size=self.n_classes, replace=False)
        ids, labels = [], []
        for label, c in enumerate(chosen):
            pool = self.pools[c]
            picks = self.rng.choice(pool, size=self.per_class, replace=len(pool) < self.per_class)
            if self.name_ids is not None:
                picks = np.append(picks, self.name_ids[self.names[c]])
            ids.append(picks)
            labels.append(np.full(len(picks), label))
        classes = tuple(self.names[c] for c in chosen)
        return Examples(torch.from_numpy(np.concatenate(ids)),
                        torch.from_numpy(np.concatenate(labels)), classes)  # fmt: skip


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over cosine similarities: for each anchor, the mean
    log-probability of its same-class texts among all other texts of the batch."""
    z = F.normalize(upcast(embeddings), dim=-1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    labels = labels.to(z.device)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positive.sum(1)
    has_positive = counts > 0  # a class with one text in the batch has no pair
    mean_pos = log_prob.masked_fill(~positive, 0.0).sum(1)[has_positive] / counts[has_positive]
    return -mean_pos.mean()


def contrastive_step(
    encoder: Encoder, sampler: ClassBatchSampler, temperature: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's loss and the share of texts whose nearest other text is of their class."""
    batch = sampler.sample()
    z = encoder(batch.ids)
    loss = supcon_loss(z, batch.labels, temperature)
    with torch.no_grad():
        n = F.normalize(upcast(z.detach()), dim=-1)
        sims = (n @ n.T).fill_diagonal_(float("-inf"))
        labels = batch.labels.to(n.device)
        acc = float((labels[sims.argmax(1)] == labels).float().mean())
    return loss, {"contrastive_loss": float(loss.detach()), "contrastive_acc": acc}


class ContrastiveStage:
    """The first `steps` steps of a run: one contrastive batch per process and step (each
    process draws its own, so N processes see N batches a step, as data parallelism does)."""

    def __init__(self, sampler: ClassBatchSampler, steps: int, temperature: float) -> None:
        self.sampler, self.steps, self.temperature = sampler, steps, temperature

    def loss(self, encoder: Encoder) -> tuple[torch.Tensor, dict[str, float]]:
        return contrastive_step(encoder, self.sampler, self.temperature)
