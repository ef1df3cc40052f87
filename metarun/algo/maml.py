"""MAML, first-order MAML and ANIL: one class, three configs (conf/algo/{maml,fomaml,anil}.yaml).

The inner loop adapts a declared subset of weights functionally (`InnerLoop`); the outer loss is
the query loss of the adapted weights, so the base `meta_loss` applies unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from metarun.algo.base import Algorithm, ManyPredictor, Predictor
from metarun.algo.inner import build_inner_loop
from metarun.backbone import Encoder, second_order_attention
from metarun.config import MAMLConfig
from metarun.errors import MetarunError
from metarun.task import Examples, TaskData


class MAML(Algorithm):
    family = "gradient"
    config = MAMLConfig

    def __init__(self, encoder: Encoder, way: int, cfg: MAMLConfig) -> None:
        super().__init__(encoder, way)
        self.inner = build_inner_loop(encoder, way, cfg, learn_lr=cfg.learn_inner_lr)
        self.first_order, self.backend = cfg.first_order, cfg.backend
        if cfg.checkpoint_inner_steps and (cfg.first_order or cfg.backend != "func"):
            raise MetarunError(
                "algo.checkpoint_inner_steps=true needs second order through algo.backend=func "
                "(algo.first_order=false): first order keeps no inner graph to checkpoint"
            )
        self.checkpoint = cfg.checkpoint_inner_steps
        self.reuse_features = cfg.reuse_features
        # Head-only adaptation reads the unadapted encoder's features: evaluation may cache them.
        self.feature_cache = not self.inner.adapts_encoder and cfg.reuse_features
        if cfg.backend == "higher":
            from metarun.algo.higher_backend import check_supported

            check_supported(self)

    def prepare(self, data: TaskData) -> None:
        self.inner.prepare(data)

    @property
    def batches_episodes(self) -> bool:
        return self.backend == "func" and self.inner.can_batch(self.encoder, self.checkpoint)

    def adapt(self, support: Examples, way: int) -> Predictor:
        steps, second = self.schedule()
        with self.attention(second):
            if self.backend == "higher":
                from metarun.algo.higher_backend import adapt_with_higher

                return adapt_with_higher(self, support, way, steps, create_graph=second)
            adapted = self.inner.run(
                self.encoder,
                support,
                way,
                steps,
                track=self.training,
                create_graph=second,
                recompute=not self.reuse_features,
                checkpoint=self.checkpoint,
            )
        return self.under_attention(adapted.predict, second)

    def adapt_many(self, supports: Sequence[Examples], way: int) -> ManyPredictor:
        """Episodes side by side in one inner loop (algo/batched.py) where the adapted weights
        allow it; otherwise one at a time."""
        if len(supports) < 2 or not self.batches_episodes:
            return super().adapt_many(supports, way)
        steps, second = self.schedule()
        with self.attention(second):
            adapted = self.inner.run_many(self.encoder, supports, way, steps,
                                          track=self.training, create_graph=second)  # fmt: skip
        return self.under_attention(adapted.predict, second)

    def schedule(self) -> tuple[int, bool]:
        """(inner steps, whether second order) in the current mode."""
        steps = self.inner.steps if self.training else self.inner.eval_steps
        return steps, self.training and not self.first_order

    @staticmethod
    def attention(second: bool) -> contextlib.AbstractContextManager:
        return second_order_attention() if second else contextlib.nullcontext()

    @staticmethod
    def under_attention(predict: Callable, second: bool) -> Callable:
        """Second order: the query forward runs under the attention kernel with a double
        backward too (the outer backward goes through it)."""
        if not second:
            return predict

        def wrapped(query):
            with second_order_attention():
                return predict(query)

        return wrapped
