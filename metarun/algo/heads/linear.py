"""The linear head: a classifier over pooled features, started afresh for every episode from
zeros, from the support set's prototypes (Proto-MAML) or from a meta-learned initialisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import encoder_params
from metarun.algo.base import upcast
from metarun.algo.protonet import prototypes
from metarun.backbone import Encoder
from metarun.config import InnerLoopFields
from metarun.errors import MetarunError
from metarun.task import Episode, Examples, TaskData

WEIGHT, BIAS = "head.weight", "head.bias"


class LinearHead(nn.Module):
    names = (WEIGHT, BIAS)
    cuts_table = True
    # Pooled features of packed texts carry no token layout by episode: episodes adapt one at
    # a time (algo/batched.py)
    batches = False
    default_adapt = None
    no_head = ""

    def __init__(self, encoder: Encoder, way: int, cfg: InnerLoopFields) -> None:
        super().__init__()
        self.init, self.way, self.dim = cfg.head_init, way, encoder.dim
        if self.init == "learned":
            self.weight = nn.Parameter(torch.randn(way, self.dim) * self.dim**-0.5)
            self.bias = nn.Parameter(torch.zeros(way))

    def prepare(self, data: TaskData) -> None:
        """Nothing of the task is needed beyond its episodes."""

    def initial(self, name: str) -> torch.Tensor | None:
        """The meta-learned tensor behind an adapted one (head_init=learned), else None."""
        if self.init != "learned":
            return None
        return {WEIGHT: self.weight, BIAS: self.bias}.get(name)

    def init_weights(
        self, feats: torch.Tensor | None, labels: torch.Tensor, way: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) before adaptation; `like` gives zeros' device and dtype."""
        if self.init == "learned":
            if way != self.way:
                raise MetarunError(f"algo.head_init=learned has {self.way} classes, not {way}")
            return self.weight, self.bias
        if self.init == "proto":  # Proto-MAML: the linear form of the euclidean ProtoNet
            protos = prototypes(upcast(feats), labels, way)
            return 2 * protos, -(protos**2).sum(-1)
        weight = like.new_zeros(way, self.dim, requires_grad=True)
        return weight, like.new_zeros(way, requires_grad=True)

    def start(
        self, encoder: Encoder, support: Examples, way: int, track: bool,
        adapts_encoder: bool, like: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:  # fmt: skip
        """The head's initial tensors, and the unadapted support features: a prototype init
        reads them, and they are every step's features when only the head adapts (ANIL:
        computed once)."""
        feats = None
        if not adapts_encoder or self.init == "proto":
            with torch.set_grad_enabled(track):
                feats = encoder(support.ids)
        labels = support.labels.to(encoder.device)
        weight, bias = self.init_weights(feats, labels, way, like)
        if not track:
            weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        return {WEIGHT: weight, BIAS: bias}, feats

    def scores(
        self, encoder: Encoder, examples: Examples, params: dict[str, torch.Tensor],
        vocab: torch.Tensor | None = None, feats: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """[examples, way] logits over `feats`, or over the features under adapted weights."""
        if feats is None:
            feats = encoder(examples.ids, params=encoder_params(params), vocab=vocab)
        return F.linear(upcast(feats), params[WEIGHT], params[BIAS])

    def scores_many(
        self, encoder: Encoder, parts: Sequence[Examples], params: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        raise MetarunError("the linear head scores one episode at a time (batches=False)")

    def objective(self, encoder: Encoder, data: TaskData) -> AllClassObjective:
        """Fine-tuning's training under this head: ordinary classification over every
        meta-train class."""
        return AllClassObjective(encoder.dim, sorted(data.splits["train"]))


class AllClassObjective(nn.Module):
    """Cross-entropy over all meta-train classes on the episodes' examples, pooled into one
    batch: the episode structure is only a source of labelled texts here."""

    def __init__(self, dim: int, classes: list[str]) -> None:
        super().__init__()
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.classifier = nn.Linear(dim, len(classes))

    def forward(
        self, encoder: Encoder, episodes: Sequence[Episode]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels = [], []
        for ep in episodes:
            for part in (ep.support, ep.query):
                ids.append(part.ids)
                labels.append(torch.tensor([self.class_index[ep.classes[i]] for i in part.labels]))
        logits = self.classifier(upcast(encoder(torch.cat(ids))))
        target = torch.cat(labels).to(logits.device)
        loss = F.cross_entropy(logits, target)
        acc = float((logits.argmax(-1) == target).float().mean())
        return loss, {"loss": float(loss.detach()), "acc": acc}
