"""Prototypical Networks (Snell et al., 2017): classify by distance to class-mean embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.algo.base import Algorithm, Predictor, register_log_scalar, upcast
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Examples

METRICS = ("euclidean", "cosine")


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Mean embedding per class label 0..way-1."""
    labels = labels.to(embeddings.device)
    sums = torch.zeros(way, embeddings.shape[-1], device=embeddings.device, dtype=embeddings.dtype)
    sums = sums.index_add(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=way).clamp_min(1).to(embeddings.dtype)
    return sums / counts[:, None]


def metric_logits(queries: torch.Tensor, protos: torch.Tensor, metric: str) -> torch.Tensor:
    queries, protos = upcast(queries), upcast(protos)
    if metric == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(protos, dim=-1).T
    return -torch.cdist(queries, protos).pow(2)


class ProtoNet(Algorithm):
    family = "metric"

    def __init__(
        self,
        encoder: Encoder,
        way: int,
        metric: str,
        temperature: float,
        learn_temperature: bool,
    ) -> None:
        super().__init__(encoder, way)
        if metric not in METRICS:
            raise MetarunError(f"algo.metric={metric}; use one of {', '.join(METRICS)}")
        self.metric = metric
        register_log_scalar(self, "log_temperature", temperature, learn_temperature, "temperature")

    def adapt(self, support: Examples, way: int) -> Predictor:
        protos = prototypes(self.encoder(support.ids), support.labels, way)

        def predict(query: Examples) -> torch.Tensor:
            logits = metric_logits(self.encoder(query.ids), protos, self.metric)
            return logits / self.log_temperature.exp()

        return predict
