"""The per-episode logistic regression that algo=frozen and ProtoNet's logreg head fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, way: int, c: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, sum of log-losses + ||W||^2 / (2c) (scikit-learn's C),
    solved with L-BFGS; the bias is not penalised."""
    weight = x.new_zeros(way, x.shape[1], requires_grad=True)
    bias = x.new_zeros(way, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)  # fmt: skip

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss = loss + (weight**2).sum() / (2 * c)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return weight.detach(), bias.detach()
