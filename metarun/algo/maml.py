"""MAML, first-order MAML and ANIL: one class, three configs (conf/algo/{maml,fomaml,anil}.yaml).

The inner loop adapts a declared subset of weights functionally (`InnerLoop`); the outer loss is
the query loss of the adapted weights, so the base `meta_loss` applies unchanged.
"""

from __future__ import annotations

import contextlib

from metarun.algo.base import Algorithm, Predictor
from metarun.algo.inner import build_inner_loop
from metarun.backbone import Encoder, second_order_attention
from metarun.errors import MetarunError
from metarun.task import Examples, TaskData

BACKENDS = ("func", "higher")


class MAML(Algorithm):
    family = "gradient"

    def __init__(
        self, encoder: Encoder, way: int, adapt: str, top_k: int, inner_steps: int,
        eval_inner_steps: int, inner_lr: float | None, head_init: str, inner_optimizer: str,
        lora_r: int, lora_alpha: int, first_order: bool, learn_inner_lr: bool,
        reuse_features: bool, backend: str, checkpoint_inner_steps: bool, head: str,
        instruction: str, template: str, separator: str, score: str,
    ) -> None:  # fmt: skip
        super().__init__(encoder, way)
        if backend not in BACKENDS:
            raise MetarunError(f"algo.backend={backend}; use one of {', '.join(BACKENDS)}")
        self.inner = build_inner_loop(
            encoder, way, adapt, top_k, inner_steps, eval_inner_steps, inner_lr, learn_inner_lr,
            head_init, inner_optimizer, (lora_r, lora_alpha), head,
            (instruction, template, separator, score),
        )  # fmt: skip
        self.first_order, self.backend = first_order, backend
        if checkpoint_inner_steps and (first_order or backend != "func"):
            raise MetarunError(
                "algo.checkpoint_inner_steps=true needs second order through algo.backend=func "
                "(algo.first_order=false): first order keeps no inner graph to checkpoint"
            )
        self.checkpoint = checkpoint_inner_steps
        self.reuse_features = reuse_features
        # Head-only adaptation reads the unadapted encoder's features: evaluation may cache them.
        self.feature_cache = not self.inner.adapts_encoder and reuse_features
        if backend == "higher":
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
