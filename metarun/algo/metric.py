"""Metric-based learners beside ProtoNet: Relation Networks and Matching Networks.

Both classify a query by comparing its embedding with the support set; what is learned is the
encoder and, for Relation Networks, the comparison itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.base import Algorithm, Predictor, fresh_module_groups, register_log_scalar, upcast
from metarun.algo.protonet import prototypes
from metarun.backbone import Encoder
from metarun.config import MatchingNetConfig, RelationNetConfig
from metarun.errors import MetarunError
from metarun.task import Examples


class RelationNet(Algorithm):
    """Sung et al. (2018): a learned module scores (class embedding, query) pairs in [0, 1].

    The class embedding is the mean support embedding; the module sees the pair concatenated,
    as in the paper. `loss=mse` regresses the scores onto one-hot targets (the paper);
    `loss=ce` treats the scores as logits.
    """

    family = "metric"

    config = RelationNetConfig

    def __init__(self, encoder: Encoder, way: int, cfg: RelationNetConfig) -> None:
        super().__init__(encoder, way)
        self.head_lr, self.loss, dim, hidden = cfg.head_lr, cfg.loss, encoder.dim, cfg.hidden
        self.relation = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def adapt(self, support: Examples, way: int) -> Predictor:
        protos = upcast(prototypes(self.encoder(support.ids), support.labels, way))

        def predict(query: Examples) -> torch.Tensor:
            q = upcast(self.encoder(query.ids))
            pairs = torch.cat(
                [protos[None].expand(len(q), -1, -1), q[:, None].expand(-1, way, -1)], dim=-1
            )
            return self.relation(pairs.to(self.relation[0].weight.dtype)).squeeze(-1)

        return predict

    def param_groups(self) -> list[dict]:
        return fresh_module_groups(self, [self.relation], self.head_lr)

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "ce":
            return super().query_loss(logits, labels)
        target = F.one_hot(labels, logits.shape[-1]).to(torch.float32)
        return F.mse_loss(torch.sigmoid(upcast(logits)), target)


class MatchingNet(Algorithm):
    """Vinyals et al. (2016): softmax attention over support examples by cosine similarity; the
    prediction is the attention mass on each class. `fce` adds the paper's full-context
    embedding of the support set (a bidirectional LSTM over it, added to each embedding)."""

    family = "metric"

    config = MatchingNetConfig

    def __init__(self, encoder: Encoder, way: int, cfg: MatchingNetConfig) -> None:
        super().__init__(encoder, way)
        self.head_lr = cfg.head_lr
        register_log_scalar(self, "log_temperature", cfg.temperature, cfg.learn_temperature)
        dim = encoder.dim
        fce = cfg.fce
        self.fce = nn.LSTM(dim, dim // 2, bidirectional=True, batch_first=True) if fce else None
        if self.fce is not None and dim % 2:
            raise MetarunError(f"algo.fce needs an even embedding size, not {dim}")

    def param_groups(self) -> list[dict]:
        return fresh_module_groups(self, [self.fce], self.head_lr)

    def context(self, support_emb: torch.Tensor) -> torch.Tensor:
        if self.fce is None:
            return support_emb
        out, _ = self.fce(support_emb[None].to(self.fce.weight_ih_l0.dtype))
        return support_emb + out[0]

    def adapt(self, support: Examples, way: int) -> Predictor:
        keys = F.normalize(self.context(upcast(self.encoder(support.ids))), dim=-1)
        onehot = F.one_hot(support.labels.to(keys.device), way).to(keys.dtype)

        def predict(query: Examples) -> torch.Tensor:
            q = F.normalize(upcast(self.encoder(query.ids)), dim=-1)
            attention = torch.softmax(q @ keys.T / self.log_temperature.exp(), dim=-1)
            # Log class probabilities: cross-entropy on them is the paper's negative log-likelihood.
            return torch.log((attention @ onehot).clamp_min(1e-12))

        return predict
