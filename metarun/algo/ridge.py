"""A differentiable ridge-regression head (R2D2, Bertinetto et al. 2019; cf. MetaOptNet).

Per episode the head is solved in closed form on the support embeddings, so there is no inner
loop to unroll: the gradient flows through the solve into the encoder. With fewer support
examples than dimensions the Woodbury form solves an n x n system instead of a d x d one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.base import Algorithm, Predictor, register_log_scalar, upcast
from metarun.backbone import Encoder
from metarun.config import RidgeConfig
from metarun.task import Examples


def ridge_solve(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """argmin_W ||x W - y||^2 + lam ||W||^2, i.e. (x^T x + lam I)^-1 x^T y, in the cheaper form."""
    n, d = x.shape
    if n < d:  # Woodbury: x^T (x x^T + lam I)^-1 y
        gram = x @ x.T + lam * torch.eye(n, dtype=x.dtype, device=x.device)
        return x.T @ torch.linalg.solve(gram, y)
    gram = x.T @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, x.T @ y)


class RidgeHead(Algorithm):
    family = "closed-form"

    config = RidgeConfig

    def __init__(self, encoder: Encoder, way: int, cfg: RidgeConfig) -> None:
        super().__init__(encoder, way)
        register_log_scalar(self, "log_lambda", cfg.lam, cfg.learn_lambda)
        # R2D2's learnable output calibration: regression targets are 0/1, logits need a scale.
        self.scale = nn.Parameter(torch.tensor(float(cfg.scale)))
        self.bias = nn.Parameter(torch.tensor(0.0))

    @staticmethod
    def with_bias(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=-1)

    def adapt(self, support: Examples, way: int) -> Predictor:
        x = self.with_bias(upcast(self.encoder(support.ids)))
        y = F.one_hot(support.labels.to(x.device), way).to(x.dtype)
        weight = ridge_solve(x, y, self.log_lambda.exp().to(x.dtype))

        def predict(query: Examples) -> torch.Tensor:
            q = self.with_bias(upcast(self.encoder(query.ids)))
            return self.scale * (q @ weight) + self.bias

        return predict
