"""MAML, first-order MAML and ANIL: one class, three configs (conf/algo/{maml,fomaml,anil}.yaml).

The inner loop adapts a declared subset of weights functionally (`InnerLoop`); the outer loss is
the query loss of the adapted weights, so the base `meta_loss` applies unchanged.
"""

from __future__ import annotations

import contextlib

from metarun.algo.base import Algorithm, Predictor
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

    def adapt(self, support: Examples, way: int) -> Predictor:
        training = self.training
        steps = self.inner.steps if training else self.inner.eval_steps
        second = training and not self.first_order
        attention = second_order_attention() if second else contextlib.nullcontext()
        with attention:
            if self.backend == "higher":
                from metarun.algo.higher_backend import adapt_with_higher

                return adapt_with_higher(self, support, way, steps, create_graph=second)
            adapted = self.inner.run(
                self.encoder,
                support,
                way,
                steps,
                track=training,
                create_graph=second,
                recompute=not self.reuse_features,
                checkpoint=self.checkpoint,
            )
        if not second:
            return adapted.predict

        def predict(query: Examples):
            with second_order_attention():
                return adapted.predict(query)

        return predict
