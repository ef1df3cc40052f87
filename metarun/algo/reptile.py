"""Reptile (Nichol et al., 2018), with its update expressed as a gradient.

After a detached inner loop on the support set reaches weights phi, the surrogate loss
0.5 * ||theta - phi||^2 has gradient theta - phi: the trainer's optimizer applies it unchanged
(plain SGD with lr = epsilon gives Reptile's theta + epsilon * (phi - theta)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metarun.algo.base import Algorithm, Predictor
from metarun.algo.inner import build_inner_loop
from metarun.backbone import Encoder
from metarun.config import ReptileConfig
from metarun.task import Episode, Examples, TaskData


class Reptile(Algorithm):
    family = "gradient"
    config = ReptileConfig

    def __init__(self, encoder: Encoder, way: int, cfg: ReptileConfig) -> None:
        super().__init__(encoder, way)
        self.inner = build_inner_loop(encoder, way, cfg)
        self.feature_cache = not self.inner.adapts_encoder

    def prepare(self, data: TaskData) -> None:
        self.inner.prepare(data)

    def initial(self, name: str) -> torch.Tensor | None:
        """The meta-parameter behind an adapted tensor, if the outer loop learns it."""
        if name.startswith("model."):
            param = self.encoder.model.get_parameter(name.removeprefix("model."))
        else:
            param = self.inner.head.initial(name)  # a meta-learned head init, if any
        return param if isinstance(param, torch.nn.Parameter) and param.requires_grad else None

    def adapt(self, support: Examples, way: int) -> Predictor:
        steps = self.inner.steps if self.training else self.inner.eval_steps
        return self.inner.run(self.encoder, support, way, steps, track=False,
                              create_graph=False).predict  # fmt: skip

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        surrogate, metrics = 0.0, {"loss": 0.0, "acc": 0.0}
        for ep in episodes:
            adapted = self.inner.run(self.encoder, ep.support, ep.way, self.inner.steps,
                                     track=False, create_graph=False)  # fmt: skip
            for name, phi in adapted.params.items():
                theta = self.initial(name)
                if theta is not None:
                    surrogate = surrogate + 0.5 * (theta - phi.to(theta.dtype)).pow(2).sum()
            with torch.no_grad():
                logits = adapted.predict(ep.query)
                labels = ep.query.labels.to(logits.device)
                metrics["loss"] += float(torch.nn.functional.cross_entropy(logits, labels))
                metrics["acc"] += float((logits.argmax(-1) == labels).float().mean())
        n = len(episodes)
        loss = surrogate / n if torch.is_tensor(surrogate) else torch.zeros((), requires_grad=True)
        return loss, {k: v / n for k, v in metrics.items()}
