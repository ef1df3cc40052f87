"""Prototypical Networks (Snell et al., 2017): classify by distance to class-mean embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.algo.base import Algorithm, Predictor, register_log_scalar, upcast
from metarun.algo.logreg import fit_logistic
from metarun.backbone import Encoder
from metarun.config import ProtoNetConfig
from metarun.errors import MetarunError
from metarun.task import Examples

LOGREG_ITERATIONS = 100  # L-BFGS iterations, as algo=frozen's default


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
    config = ProtoNetConfig

    def __init__(self, encoder: Encoder, way: int, cfg: ProtoNetConfig) -> None:
        super().__init__(encoder, way)
        if cfg.transductive_steps and cfg.eval_head != "prototypes":
            raise MetarunError(f"algo.transductive_steps={cfg.transductive_steps} refines "
                               "prototypes; use it with algo.eval_head=prototypes")  # fmt: skip
        self.metric, self.eval_head, self.c = cfg.metric, cfg.eval_head, cfg.c
        self.transductive_steps = cfg.transductive_steps
        register_log_scalar(self, "log_temperature", cfg.temperature, cfg.learn_temperature)

    def adapt(self, support: Examples, way: int) -> Predictor:
        if self.eval_head == "logreg" and not self.training:
            return self.logreg(support, way)
        if self.transductive_steps and not self.training:
            return self.transductive(support, way)
        protos = prototypes(self.encoder(support.ids), support.labels, way)

        def predict(query: Examples) -> torch.Tensor:
            logits = metric_logits(self.encoder(query.ids), protos, self.metric)
            return logits / self.log_temperature.exp()

        return predict

    def logreg(self, support: Examples, way: int) -> Predictor:
        """Evaluation only: a regularised logistic regression on the support set, which uses
        several shots better than their mean does (prototypes remain the training head)."""
        x = F.normalize(upcast(self.encoder(support.ids)), dim=-1)
        weight, bias = fit_logistic(x, support.labels.to(x.device), way, self.c, LOGREG_ITERATIONS)

        def predict(query: Examples) -> torch.Tensor:
            return F.normalize(upcast(self.encoder(query.ids)), dim=-1) @ weight.T + bias

        return predict

    def transductive(self, support: Examples, way: int) -> Predictor:
        """Evaluation only: the queries, unlabelled, refine the prototypes (soft k-means, Ren et
        al., 2018): each step moves a prototype to the mean of its support texts and of the
        queries weighted by their current probability of the class. Features are first centred
        on the episode's mean, so what all its texts share (the domain) does not count as
        similarity. A query's prediction depends on the other queries of its episode."""

        def predict(query: Examples) -> torch.Tensor:
            s, q = upcast(self.encoder(support.ids)), upcast(self.encoder(query.ids))
            if self.metric == "cosine":
                s, q = F.normalize(s, dim=-1), F.normalize(q, dim=-1)
            centre = torch.cat([s, q]).mean(0)
            s, q = s - centre, q - centre
            labels = support.labels.to(s.device)
            sums = torch.zeros(way, s.shape[1], device=s.device, dtype=s.dtype)
            sums = sums.index_add(0, labels, s)
            counts = torch.bincount(labels, minlength=way).to(s.dtype)[:, None]
            protos, temperature = sums / counts.clamp_min(1), self.log_temperature.exp()
            for _ in range(self.transductive_steps):
                weights = torch.softmax(metric_logits(q, protos, self.metric) / temperature, -1)
                protos = (sums + weights.T @ q) / (counts + weights.sum(0)[:, None])
            return metric_logits(q, protos, self.metric) / temperature

        return predict
