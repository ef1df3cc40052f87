"""The finite-difference check of meta-gradients that the BERT and Llama tests share."""

from __future__ import annotations

import torch


def meta_grads(algo, episodes) -> dict[str, torch.Tensor]:
    algo.zero_grad()
    loss, _ = algo.meta_loss(episodes)
    loss.backward()
    return {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}


def check_against_finite_differences(algo, episodes, eps: float) -> dict[str, torch.Tensor]:
    """The meta-gradient along a random direction against central differences of the meta-loss
    (float64); returns the meta-gradient."""
    grads = meta_grads(algo, episodes)
    assert grads
    params = dict(algo.named_parameters())
    gen = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(g.shape, generator=gen, dtype=g.dtype) for n, g in grads.items()}
    analytic = float(sum((grads[n] * d).sum() for n, d in direction.items()))

    def loss_at(scale: float) -> float:
        with torch.no_grad():
            for n, d in direction.items():
                params[n].add_(scale * d)
        loss = float(algo.meta_loss(episodes)[0].detach())
        with torch.no_grad():
            for n, d in direction.items():
                params[n].sub_(scale * d)
        return loss

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    return grads
