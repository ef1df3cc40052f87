"""A functional inner loop: a linear head plus a declared subset of encoder parameters, or, with
the verbalizer head, a decoder's own label-name scores under its adapted weights.

Adapted weights live in a dict passed to `torch.func.functional_call`; the module itself is
never modified or copied. With `track=True` the adapted weights stay functions of the initial
ones (second order when `create_graph`, first order otherwise); with `track=False` each step is
detached, which is what evaluation and Reptile need and keeps memory flat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import (
    adapted_names,
    inject_lora,
    inner_rate,
    resolve_adapt,
    untied_input_embedding,
)
from metarun.algo.base import upcast
from metarun.algo.prompting import Verbalizer
from metarun.algo.protonet import prototypes
from metarun.algo.recompute import checkpointed_step
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Examples, TaskData

HEAD_INITS = ("zeros", "proto", "learned")
INNER_OPTIMIZERS = ("sgd", "adam")
HEAD = ("head.weight", "head.bias")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class Adapted:
    params: dict[str, torch.Tensor]  # "model.<name>" for encoder tensors, plus HEAD
    support_loss: float  # after the last step's update was computed (before it was applied)
    predict: Callable[[Examples], torch.Tensor]


def build_inner_loop(
    encoder: Encoder, way: int, adapt: str, top_k: int, steps: int, eval_steps: int,
    lr: float | None, learn_lr: bool, head_init: str, optimizer: str, lora: tuple[int, int],
    head: str = "linear", prompt: tuple[str, str, str, str] | None = None,
    linear_default: str = "all", default_lr: float = 1e-3,
) -> InnerLoop:  # fmt: skip
    """The inner loop an algorithm's `adapt` options describe (injecting LoRA when asked).
    `prompt`: the verbalizer's (instruction, template, separator, score); `default_lr`: the
    rate when `lr` is None and LoRA does not adapt."""
    adapt = resolve_adapt(adapt, head, linear_default)
    lr = inner_rate(lr, adapt, default_lr)
    verbalizer = None
    if head == "verbalizer":
        if not encoder.causal_lm:
            raise MetarunError(
                f"algo.head=verbalizer scores label names with a decoder's LM head, and "
                f"{encoder.name} is an encoder; use algo.head=linear, or a decoder backbone "
                "(backbone=smollm2)"
            )
        verbalizer = Verbalizer(encoder, *(prompt or ()))
    if adapt == "lora":
        inject_lora(encoder.model, *lora, encoder.lora_targets)
    names = adapted_names(encoder.model, adapt, top_k)
    if adapt != "head" and not names:
        raise MetarunError(f"algo.adapt={adapt}: {encoder.name} has no such weights to adapt")
    return InnerLoop(encoder, way, names, steps, eval_steps, lr, learn_lr, head_init, optimizer,
                     verbalizer)  # fmt: skip


class InnerLoop(nn.Module):
    def __init__(
        self, encoder: Encoder, way: int, names: list[str], steps: int, eval_steps: int,
        lr: float, learn_lr: bool, head_init: str, optimizer: str,
        verbalizer: Verbalizer | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.verbalizer = verbalizer
        if head_init not in HEAD_INITS:
            raise MetarunError(f"algo.head_init={head_init}; use one of {', '.join(HEAD_INITS)}")
        if optimizer not in INNER_OPTIMIZERS:
            raise MetarunError(
                f"algo.inner_optimizer={optimizer}; use one of {', '.join(INNER_OPTIMIZERS)}"
            )
        if steps < 0 or eval_steps < 0:
            raise MetarunError("algo.inner_steps and algo.eval_inner_steps must be >= 0")
        self.names, self.way, self.head_dim = names, way, encoder.dim
        # The input embedding table adapts only in the rows of the episode's tokens (the others
        # get zero gradient): the inner loop carries those rows, not the whole vocabulary.
        # (Not under the verbalizer: its prompts hold tokens beyond the episode's texts.)
        table = untied_input_embedding(encoder.model)
        self.table = f"model.{table}" if table in names and verbalizer is None else None
        self.steps, self.eval_steps = steps, eval_steps
        self.head_init, self.optimizer = head_init, optimizer
        # One learning rate per adapted tensor and per training step (MAML++ "LSLR");
        # evaluation steps beyond the trained ones reuse the last row.
        lrs = torch.full((max(steps, 1), len(names) + len(HEAD)), float(lr))
        if learn_lr:
            self.lrs = nn.Parameter(lrs)
        else:
            self.register_buffer("lrs", lrs)
        if head_init == "learned" and verbalizer is None:
            self.head_weight = nn.Parameter(torch.randn(way, encoder.dim) * encoder.dim**-0.5)
            self.head_bias = nn.Parameter(torch.zeros(way))

    @property
    def adapts_encoder(self) -> bool:
        return bool(self.names)

    def prepare(self, data: TaskData) -> None:
        """The verbalizer reads every class's readable name."""
        if self.verbalizer is not None:
            self.verbalizer.label_names = dict(data.label_names)

    def init_head(self, feats: torch.Tensor | None, labels: torch.Tensor, way: int, like):
        """(weight, bias) of the head before adaptation; `like` gives zeros' device and dtype."""
        if self.head_init == "learned":
            if way != self.way:
                raise MetarunError(f"algo.head_init=learned has {self.way} classes, not {way}")
            return self.head_weight, self.head_bias
        if self.head_init == "proto":  # Proto-MAML: the linear form of the euclidean ProtoNet
            protos = prototypes(upcast(feats), labels, way)
            return 2 * protos, -(protos**2).sum(-1)
        weight = like.new_zeros(way, self.head_dim, requires_grad=True)
        return weight, like.new_zeros(way, requires_grad=True)

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
        with torch.enable_grad():
            vocab = encoder.local_vocab(support.ids) if self.table else None
            params, table = self.start(encoder, track, vocab)
            labels = support.labels.to(encoder.tokens.device)
            # Unadapted support features: needed for a prototype head, and they are the
            # features of every step when only the head adapts (ANIL: computed once).
            feats0 = None
            linear = self.verbalizer is None
            if linear and (not self.names or self.head_init == "proto"):
                with torch.set_grad_enabled(track):
                    feats0 = encoder(support.ids)
            if linear:
                weight, bias = self.init_head(feats0, labels, way, self.lrs)
                if not track:
                    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
                params |= dict(zip(HEAD, (weight, bias), strict=True))
            state: dict[str, torch.Tensor] = {}
            fixed = self.fixed_inputs(encoder, params) if checkpoint else {}
            loss = torch.tensor(float("nan"))
            for step in range(steps):
                if checkpoint:
                    params, state, loss = self.checkpointed(
                        encoder, support, labels, vocab, params, state, fixed, step
                    )
                    continue
                if not self.names and not recompute:  # head only: the features of step 0
                    logits = self.logits(feats0, params)
                else:
                    logits = self.scores(encoder, support, params, vocab)
                loss = F.cross_entropy(logits, labels)
                params = self.update(params, loss, step, track, create_graph, state)
            if vocab is not None:  # the whole adapted table: any query token may appear
                params[self.table] = table.index_copy(0, vocab, params[self.table])
        if not track:
            params = {k: v.detach() for k, v in params.items()}

        def predict(query: Examples) -> torch.Tensor:
            return self.scores(encoder, query, params)

        return Adapted(params, float(loss.detach()), predict)

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
            loss = F.cross_entropy(self.scores(encoder, support, weights, vocab), labels)
            new_state = {k: inputs[k] for k in state}
            rates = inputs.get("lrs", self.lrs)
            new = self.update(adapted, loss, step, True, create_graph, new_state, rates)
            return new | new_state, loss

        out, loss = checkpointed_step(run, params | state | fixed)
        return {k: out[k] for k in params}, {k: v for k, v in out.items() if k not in params}, loss

    def scores(
        self, encoder: Encoder, examples: Examples, params: dict, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[examples, way] logits: the linear head over (adapted) features, or the verbalizer's
        label scores under the adapted decoder weights."""
        if self.verbalizer is not None:
            return self.verbalizer(examples, self.encoder_params(params))
        return self.logits(self.features(encoder, examples, params, vocab), params)

    @staticmethod
    def encoder_params(params: dict) -> dict[str, torch.Tensor]:
        return {k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")}

    def features(
        self, encoder: Encoder, examples: Examples, params: dict, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.names:
            return encoder(examples.ids)  # head-only: the encoder's own features (cacheable)
        return encoder(examples.ids, params=self.encoder_params(params), vocab=vocab)

    @staticmethod
    def logits(feats: torch.Tensor, params: dict) -> torch.Tensor:
        return F.linear(upcast(feats), params["head.weight"], params["head.bias"])

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
                direction = self.adam(name, grad, step, state) if self.optimizer == "adam" else grad
                value = value - lrs[i] * direction
            new[name] = value if track else value.detach().requires_grad_()
        return new

    @staticmethod
    def adam(name: str, grad: torch.Tensor, step: int, state: dict) -> torch.Tensor:
        """A differentiable Adam direction (bias-corrected); the moments of each adapted tensor
        live in the flat `state` under "m:<name>" and "v:<name>"."""
        (b1, b2), m, v = ADAM_BETAS, f"m:{name}", f"v:{name}"
        state[m] = b1 * state.get(m, torch.zeros_like(grad)) + (1 - b1) * grad
        state[v] = b2 * state.get(v, torch.zeros_like(grad)) + (1 - b2) * grad * grad
        m_hat = state[m] / (1 - b1 ** (step + 1))
        v_hat = state[v] / (1 - b2 ** (step + 1))
        return m_hat / ((v_hat + ADAM_EPS**2).sqrt() + ADAM_EPS)
