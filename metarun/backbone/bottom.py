"""Adapt the top, compute the bottom once.

When an inner loop adapts only tensors of the top transformer blocks (`algo.adapt=top_k`, or
LoRA / biases in the last `algo.adapt_layers` blocks), the blocks below see the same inputs at
every inner step: inside `Encoder.frozen_below(split)` they run once per distinct input (an
episode's support batch or prompt trees), and every step replays only the blocks from `split`
up, from the saved input of block `split` (its hidden states and the mask and position
arguments the model gave it). Exact where the bottom is deterministic (evaluation, or training
without dropout: decoders such as Llama and SmolLM2 have none) and every block takes the same
arguments (`replayable`); `Encoder.frozen_below` runs every block elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metarun.backbone.packing import attention_mask
from metarun.errors import MetarunError

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
# Architectures whose blocks all take the same mask and position arguments, so the arguments
# captured for one block serve every block above it (tests: BERT, GPT-2, Llama). Others, and
# models mixing attention types (sliding-window layers get another mask), run every block.
REPLAYABLE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "gpt2", "llama",
              "mistral", "qwen2", "qwen3")  # fmt: skip


# On a CPU, rows up to this wide replay their attention as plain matmuls (the model's eager
# attention): at an episode's ~190-token support tree that runs the forward and backward 2.6x
# faster than SDPA's fused CPU kernel, whose backward costs 3.5x its forward; wider rows (a query
# tree of 1,000 tokens) are faster fused (docs/BENCHMARKS.md). 0: always the model's own.
EAGER_WIDTH = 512


def replayable(model: nn.Module) -> bool:
    config = model.config
    if getattr(config, "_heterogeneity_spec", None) is not None:  # per-layer configs
        return False
    kinds = set(getattr(config, "layer_types", None) or ())
    return config.model_type in REPLAYABLE and len(kinds) <= 1


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the ModuleList as long as the model has layers."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise MetarunError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def has_dropout(model: nn.Module) -> bool:
    """Whether a forward in training mode draws dropout masks (modules or attention's rate)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    return any(float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0 for m in model.modules())


class _Reached(Exception):
    """Raised by the hook on block `split` once it has its inputs: the rest is not run."""


def final_norm(body: nn.Module) -> tuple[str, nn.Module] | None:
    """The module between the last block and the last hidden states (Llama's `norm`, GPT-2's
    `ln_f`); None for BERT-style encoders, whose last block's output is the result."""
    for name in FINAL_NORMS:
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


def fingerprint(inputs: dict[str, torch.Tensor]) -> str:
    """What a forward's inputs hold (ids, masks, positions), as a short digest."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(inputs):
        value = inputs[key]
        digest.update(f"{key}{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FrozenBottom:
    def __init__(self, body: nn.Module, layers: nn.ModuleList, split: int, keep_graph: bool):
        self.body, self.layers, self.split, self.keep_graph = body, layers, split, keep_graph
        self.layers_name = next(n for n, m in body.named_modules() if m is layers)
        self.final = final_norm(body)
        accepts = "use_cache" in inspect.signature(body.forward).parameters
        self.no_cache = {"use_cache": False} if accepts else {}
        self.saved: dict[str, tuple[torch.Tensor, tuple, dict[str, Any]]] = {}

    def hidden(self, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor]):
        """The last hidden states of `inputs`, with `params` (named as in the body) adapting
        only blocks from `split` up and the final norm."""
        key = fingerprint(inputs)
        if key not in self.saved:
            self.saved[key] = self.bottom(inputs)
        hidden, args, kwargs = self.saved[key]
        with self.attention(hidden, kwargs) as kwargs:
            for index in range(self.split, len(self.layers)):
                own = self.own(params, f"{self.layers_name}.{index}.")
                layer = self.layers[index]
                out = functional_call(layer, own, (hidden, *args), kwargs, strict=False) if own \
                    else layer(hidden, *args, **kwargs)  # fmt: skip
                hidden = out[0] if isinstance(out, tuple) else out
        if self.final is not None:
            name, norm = self.final
            own = self.own(params, f"{name}.")
            hidden = functional_call(norm, own, (hidden,)) if own else norm(hidden)
        return hidden

    @contextlib.contextmanager
    def attention(self, hidden: torch.Tensor, kwargs: dict) -> Iterator[dict]:
        """The replayed blocks' keyword arguments, under eager attention where that is faster
        (`EAGER_WIDTH`) and the blocks take a prepared 4D mask by name (Llama-family layers),
        which eager attention needs additive; SDPA and eager compute the same attention. Not
        in float64, whose precision eager attention's float32 softmax would lose."""
        config = self.body.config
        mask = kwargs.get("attention_mask")
        if (
            hidden.device.type != "cpu" or hidden.shape[1] > EAGER_WIDTH
            or hidden.dtype == torch.float64 or config._attn_implementation != "sdpa"
            or not isinstance(mask, torch.Tensor) or mask.dim() != 4
        ):  # fmt: skip
            yield kwargs
            return
        if mask.dtype == torch.bool:
            mask = attention_mask(mask, hidden.dtype)
        config._attn_implementation = "eager"
        try:
            yield {**kwargs, "attention_mask": mask}
        finally:
            config._attn_implementation = "sdpa"

    @staticmethod
    def own(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}

    def bottom(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple, dict]:
        """The input of block `split`: the body runs up to it, with the model's own weights
        (nothing below `split` adapts), keeping its graph only when the caller tracks one."""
        seen: dict[str, Any] = {}

        def reached(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Reached

        handle = self.layers[self.split].register_forward_pre_hook(reached, with_kwargs=True)
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.keep_graph):
                # no key/value cache: its object would reach the replayed blocks, which would
                # append to it at every step (outputs are the same without it)
                self.body(**inputs, **self.no_cache)
        except _Reached:
            pass
        finally:
            handle.remove()
        args = seen["args"]
        return args[0], args[1:], seen["kwargs"]
