"""Which encoder parameters an inner loop adapts: a declared subset, never a copy of the model."""

from __future__ import annotations

import torch
from torch import nn

from metarun.backbone import transformer_layers
from metarun.errors import MetarunError

# The inner rate when `algo.inner_lr` is unset and LoRA adapts. Chosen on validation classes
# (BANKING77 split 01, SmolLM2, verbalizer head, 1-shot, 10 SGD steps: 1e-3 left accuracy at the
# zero-shot 31-33%, 0.1 reached 80%, 1.0 diverged to chance; docs/RESULTS.md).
LORA_INNER_LR = 0.1


def inner_rate(lr: float | None, adapt: str, otherwise: float = 1e-3) -> float:
    """`algo.inner_lr` (or finetune's `eval_lr`), or its default for what adapts: `otherwise`
    (1e-3 suits a pretrained model's weights) unless LoRA adapts."""
    if lr is None:
        return LORA_INNER_LR if adapt == "lora" else otherwise
    return lr


def encoder_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The adapted encoder tensors ("model.<name>" -> "<name>"); None when only a head adapts,
    so that the encoder's own (cacheable) forward runs."""
    own = {k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")}
    return own or None


def inject_lora(model: nn.Module, r: int, alpha: int, targets: list[str], layers: int = 0) -> None:
    """Add LoRA tensors (peft) to the `targets` linear layers (backbone.lora_targets) of the
    last `layers` transformer blocks (0: all), in place; they start trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    blocks = len(transformer_layers(model))
    last = list(range(first_block(model, layers, "algo.adapt_layers"), blocks)) if layers else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                        layers_to_transform=last)  # fmt: skip
    # peft freezes the base weights; whether they meta-train stays backbone.trainable's choice
    # (backbone.trainable=none is the memory-lean setting: only LoRA and the head learn).
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise MetarunError(
            f"backbone.lora_targets={list(targets)}: {err}; name linear layers of the backbone"
        ) from err
    for name, param in model.named_parameters():
        base = name.replace(".base_layer", "")
        param.requires_grad_(is_lora(name) or trainable.get(base, trainable.get(name, False)))


def is_lora(name: str) -> bool:
    """Whether parameter `name` is a LoRA factor (peft's lora_A / lora_B), not a backbone
    weight."""
    return "lora_" in name


def untied_input_embedding(model: nn.Module) -> str | None:
    """Name of the token embedding table, unless an output layer shares it (then every row
    matters to every prediction and the table cannot be cut to an episode's tokens)."""
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is table:
        return None
    return next((n for n, p in model.named_parameters() if p is table), None)


def adapted_names(model: nn.Module, adapt: str, top_k: int, layers: int = 0) -> list[str]:
    """Names (as in `model.named_parameters()`) of the tensors the inner loop updates; with
    `layers`, only those of the last `layers` transformer blocks."""
    names = _adapted(model, adapt, top_k)
    if layers <= 0:
        return names
    return in_last_blocks(model, names, layers, "algo.adapt_layers")


def in_last_blocks(model: nn.Module, names: list[str], layers: int, key: str) -> list[str]:
    """Those of `names` that belong to the last `layers` transformer blocks (option `key`)."""
    found, first = block_of(model), first_block(model, layers, key)
    return [n for n in names if found.get(n, -1) >= first]


def first_block(model: nn.Module, layers: int, key: str) -> int:
    """The index of the first of the last `layers` transformer blocks (option `key`)."""
    blocks = len(transformer_layers(model))
    if not 0 < layers <= blocks:
        raise MetarunError(f"{key}={layers}; the backbone has {blocks} layers")
    return blocks - layers


def block_of(model: nn.Module) -> dict[str, int]:
    """Each parameter name inside a transformer block -> that block's index."""
    ids = {id(p): i for i, layer in enumerate(transformer_layers(model))
           for p in layer.parameters()}  # fmt: skip
    return {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}


def frozen_split(model: nn.Module, names: list[str]) -> int:
    """The lowest block holding an adapted tensor: every block below it sees the same inputs at
    each inner step. 0 when something outside the blocks adapts (the embedding table)."""
    found = block_of(model)
    if not names or any(n not in found for n in names):
        return 0
    return min(found[n] for n in names)


def _adapted(model: nn.Module, adapt: str, top_k: int) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if adapt == "head":
        return []
    if adapt == "all":
        return [n for n in names if not is_lora(n)]
    if adapt == "bias":
        return [n for n in names if n.endswith(".bias")]
    if adapt == "lora":
        found = [n for n in names if is_lora(n)]
        if not found:
            raise MetarunError("algo.adapt=lora but the backbone has no LoRA tensors")
        return found
    return in_last_blocks(model, names, top_k, "algo.top_k")  # adapt=top_k
