"""A functional inner loop over a declared subset of encoder parameters plus the head's own
tensors; the head (algo/heads/) turns adapted weights into class scores.

Adapted weights live in a dict passed to `torch.func.functional_call`; the module itself is
never modified or copied. With `track=True` the adapted weights stay functions of the initial
ones (second order when `create_graph`, first order otherwise); with `track=False` each step is
detached, which is what evaluation and Reptile need and keeps memory flat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import (
    adapted_names,
    frozen_split,
    inject_lora,
    inner_rate,
    untied_input_embedding,
)
from metarun.algo.batched import batchable, side_by_side
from metarun.algo.heads import Head, build_head, resolve_adapt
from metarun.algo.recompute import checkpointed_step
from metarun.backbone import Encoder
from metarun.config import InnerLoopFields
from metarun.errors import MetarunError
from metarun.task import Examples, TaskData

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class Adapted:
    params: dict[str, torch.Tensor]  # "model.<name>" for encoder tensors, plus the head's
    support_loss: float  # after the last step's update was computed (before it was applied)
    predict: Callable[[Examples], torch.Tensor]


@dataclass
class AdaptedMany:
    """Several episodes adapted at once (`InnerLoop.run_many`)."""

    params: dict[str, torch.Tensor]  # every episode's LoRA factors side by side (batched.py)
    support_losses: list[float]  # per episode, as `Adapted.support_loss`
    predict: Callable[[Sequence[Examples]], list[torch.Tensor]]  # query sets -> logits each


def build_inner_loop(
    encoder: Encoder, way: int, cfg: InnerLoopFields, learn_lr: bool = False,
    linear_default: str = "all",
) -> InnerLoop:  # fmt: skip
    """The inner loop `cfg` describes (injecting LoRA when asked); `linear_default`: what
    `algo.adapt=auto` adapts under a head that leaves the choice to the algorithm."""
    adapt = resolve_adapt(cfg.adapt, cfg.head, linear_default)
    lr = inner_rate(cfg.inner_lr, adapt)
    if adapt == "lora":
        inject_lora(encoder.model, cfg.lora_r, cfg.lora_alpha, encoder.lora_targets,
                    cfg.adapt_layers)  # fmt: skip
    head = build_head(encoder, way, cfg)
    names = adapted_names(encoder.model, adapt, cfg.top_k, cfg.adapt_layers)
    if adapt != "head" and not names:
        raise MetarunError(f"algo.adapt={adapt}: {encoder.name} has no such weights to adapt")
    return InnerLoop(encoder, head, names, cfg, lr, learn_lr)


class InnerLoop(nn.Module):
    def __init__(
        self, encoder: Encoder, head: Head, names: list[str], cfg: InnerLoopFields, lr: float,
        learn_lr: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.names = names
        # Blocks below `split` hold nothing adapted: they run once per episode (bottom.py)
        self.split = frozen_split(encoder.model, names) if cfg.cache_frozen_layers else 0
        # The input embedding table adapts only in the rows of the episode's tokens (the others
        # get zero gradient): the inner loop carries those rows, not the whole vocabulary,
        # where the head reads nothing but the episode's tokens.
        table = untied_input_embedding(encoder.model)
        self.table = f"model.{table}" if table in names and head.cuts_table else None
        self.steps, self.eval_steps = cfg.inner_steps, cfg.eval_inner_steps
        self.optimizer = cfg.inner_optimizer
        # One learning rate per adapted tensor and per training step (MAML++ "LSLR");
        # evaluation steps beyond the trained ones reuse the last row.
        lrs = torch.full((max(self.steps, 1), len(names) + len(head.names)), float(lr))
        if learn_lr:
            self.lrs = nn.Parameter(lrs)
        else:
            self.register_buffer("lrs", lrs)
        self.head = head
        # Whether episodes can adapt side by side: LoRA factors are all that adapts, and the
        # head scores several episodes in one forward (a head without `batches` does not)
        many = getattr(head, "batches", False)
        self.batchable = many and self.table is None and batchable(encoder.model, names)

    def can_batch(self, encoder: Encoder, checkpoint: bool = False) -> bool:
        """`run_many` applies: nothing would replay a forward outside its context (activation
        checkpointing of the encoder, checkpointed inner steps)."""
        return self.batchable and not encoder.checkpointing and not checkpoint

    @property
    def adapts_encoder(self) -> bool:
        return bool(self.names)

    def prepare(self, data: TaskData) -> None:
        self.head.prepare(data)

    def start(self, encoder: Encoder, track: bool, vocab: torch.Tensor | None):
        """The initial adapted tensors (the embedding table's `vocab` rows only) and the
        whole initial table, which the adapted rows are written back into at the end."""
        params = {f"model.{n}": encoder.model.get_parameter(n) for n in self.names}
        # An alias, not the parameter itself: the inner gradient is the partial one with the
        # head as its own variable (as at every later step), not through the prototype init.
        params = {
            k: v.view_as(v) if (track and v.requires_grad) else v.detach().requires_grad_()
            for k, v in params.items()
        }
        table = None
        if vocab is not None:
            table = params[self.table]
            rows = table[vocab]
            params[self.table] = rows if track else rows.detach().requires_grad_()
        return params, table

    def run(
        self, encoder: Encoder, support: Examples, way: int, steps: int, track: bool,
        create_graph: bool, recompute: bool = False, checkpoint: bool = False,
    ) -> Adapted:  # fmt: skip
        """Adapt on `support`; returns the adapted weights and a query predictor.

        `recompute` re-encodes the support set at every step even when only the head adapts:
        the plain MAML path, against which ANIL's encode-once shortcut is tested. `checkpoint`
        (second order, encoder weights adapted) keeps no graph per step: see algo/recompute.py.
        """
        checkpoint = checkpoint and track and create_graph and bool(self.names)
        # A checkpointed step recomputes its forward from its own inputs only: no saved bottom
        bottom = encoder.frozen_below(0 if checkpoint else self.split, keep_graph=track)
        with torch.enable_grad(), bottom:
            vocab = encoder.local_vocab(support.ids) if self.table else None
            params, table = self.start(encoder, track, vocab)
            labels = support.labels.to(encoder.device)
            head, feats0 = self.head.start(encoder, support, way, track, self.adapts_encoder,
                                           self.lrs)  # fmt: skip
            params |= head
            # Head only: every step reads the unadapted features of step 0 (unless `recompute`)
            feats = feats0 if not self.names and not recompute else None
            state: dict[str, torch.Tensor] = {}
            fixed = self.fixed_inputs(encoder, params) if checkpoint else {}
            loss = torch.tensor(float("nan"))
            for step in range(steps):
                if checkpoint:
                    params, state, loss = self.checkpointed(
                        encoder, support, labels, vocab, params, state, fixed, step
                    )
                    continue
                logits = self.head.scores(encoder, support, params, vocab, feats)
                loss = F.cross_entropy(logits, labels)
                params = self.update(params, loss, step, track, create_graph, state)
            if vocab is not None:  # the whole adapted table: any query token may appear
                params[self.table] = table.index_copy(0, vocab, params[self.table])
        if not track:
            params = {k: v.detach() for k, v in params.items()}

        def predict(query: Examples) -> torch.Tensor:
            return self.head.scores(encoder, query, params)

        return Adapted(params, float(loss.detach()), predict)

    def run_many(
        self, encoder: Encoder, supports: Sequence[Examples], way: int, steps: int, track: bool,
        create_graph: bool,
    ) -> AdaptedMany:  # fmt: skip
        """`run` for several episodes at once, each with its own LoRA factors (batched.py)."""
        if not self.can_batch(encoder):
            raise MetarunError("these adapted weights cannot be batched by episode")
        n, state = len(supports), {}
        bottom = encoder.frozen_below(self.split, keep_graph=track)
        with torch.enable_grad(), bottom:
            params = side_by_side(self.start(encoder, track, None)[0], n, track)
            labels = [s.labels.to(encoder.device) for s in supports]
            losses = [torch.tensor(float("nan"))] * n
            for step in range(steps):
                scores = self.head.scores_many(encoder, supports, params)
                losses = [F.cross_entropy(x, y) for x, y in zip(scores, labels, strict=True)]
                total = torch.stack(losses).sum()
                params = self.update(params, total, step, track, create_graph, state)
        if not track:
            params = {k: v.detach() for k, v in params.items()}

        def predict(queries: Sequence[Examples]) -> list[torch.Tensor]:
            if len(queries) != n:
                raise MetarunError(f"{len(queries)} query sets for {n} adapted episodes")
            return self.head.scores_many(encoder, queries, params)

        return AdaptedMany(params, [float(x.detach()) for x in losses], predict)

    def fixed_inputs(self, encoder: Encoder, params: dict) -> dict[str, torch.Tensor]:
        """What a checkpointed step reads besides the adapted tensors and the inner Adam state
        and may need a gradient for: encoder weights that train but do not adapt, and learned
        inner rates. The same at every step of one adaptation."""
        fixed = {f"model.{n}": p for n, p in encoder.model.named_parameters()
                 if p.requires_grad and f"model.{n}" not in params}  # fmt: skip
        if isinstance(self.lrs, nn.Parameter):
            fixed["lrs"] = self.lrs
        return fixed

    def checkpointed(
        self, encoder: Encoder, support: Examples, labels: torch.Tensor,
        vocab: torch.Tensor | None, params: dict, state: dict, fixed: dict, step: int,
    ) -> tuple[dict, dict, torch.Tensor]:  # fmt: skip
        """One second-order step through `checkpointed_step`, whose inputs are the adapted
        tensors, the inner Adam state and `fixed` (see `fixed_inputs`)."""

        def run(inputs: dict[str, torch.Tensor], create_graph: bool):
            adapted = {k: inputs[k] for k in params}
            weights = adapted | {k: v for k, v in inputs.items() if k.startswith("model.")}
            loss = F.cross_entropy(self.head.scores(encoder, support, weights, vocab), labels)
            new_state = {k: inputs[k] for k in state}
            rates = inputs.get("lrs", self.lrs)
            new = self.update(adapted, loss, step, True, create_graph, new_state, rates)
            return new | new_state, loss

        out, loss = checkpointed_step(run, params | state | fixed)
        return {k: out[k] for k in params}, {k: v for k, v in out.items() if k not in params}, loss

    def update(
        self, params: dict, loss: torch.Tensor, step: int, track: bool, create_graph: bool,
        state: dict, rates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        # First order keeps the graph too: the head's prototype init depends on the initial
        # weights, and the outer backward still goes through it.
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=create_graph, retain_graph=track,
            allow_unused=True,
        )  # fmt: skip
        rates = self.lrs if rates is None else rates
        lrs = rates[min(step, len(rates) - 1)]  # columns follow the order of `params`
        new = {}
        for i, (name, grad) in enumerate(zip(params, grads, strict=True)):
            value = params[name]
            if grad is not None:
                direction = adam(name, grad, step, state) if self.optimizer == "adam" else grad
                value = value - lrs[i] * direction
            new[name] = value if track else value.detach().requires_grad_()
        return new


def adam(name: str, grad: torch.Tensor, step: int, state: dict) -> torch.Tensor:
    """A differentiable Adam direction (bias-corrected); the moments of each adapted tensor
    live in the flat `state` under "m:<name>" and "v:<name>"."""
    (b1, b2), m, v = ADAM_BETAS, f"m:{name}", f"v:{name}"
    state[m] = b1 * state.get(m, torch.zeros_like(grad)) + (1 - b1) * grad
    state[v] = b2 * state.get(v, torch.zeros_like(grad)) + (1 - b2) * grad * grad
    m_hat = state[m] / (1 - b1 ** (step + 1))
    v_hat = state[v] / (1 - b2 ** (step + 1))
    return m_hat / ((v_hat + ADAM_EPS**2).sqrt() + ADAM_EPS)


def adapted_encoder_weights(algo: nn.Module) -> set[str]:
    """The encoder weights (names in `encoder.model`) some inner loop of `algo` adapts per
    episode: what must stay in full precision when frozen weights are stored in bf16."""
    return {name for m in algo.modules() if isinstance(m, InnerLoop) for name in m.names}
