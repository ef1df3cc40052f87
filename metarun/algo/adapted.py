"""Which encoder parameters an inner loop adapts: a declared subset, never a copy of the model."""

from __future__ import annotations

from torch import nn

from metarun.backbone import transformer_layers
from metarun.errors import MetarunError

ADAPT = ("all", "head", "top_k", "bias", "lora")
HEADS = ("linear", "verbalizer")


def resolve_adapt(adapt: str, head: str, linear_default: str) -> str:
    """`algo.adapt=auto`: LoRA under the verbalizer head (a decoder's weights are the
    classifier; LoRA is the lean way to adapt them), the algorithm's own choice under a linear
    head. The verbalizer has no head of its own, so adapting only the head is refused."""
    if head not in HEADS:
        raise MetarunError(f"algo.head={head}; use one of {', '.join(HEADS)}")
    if adapt == "auto":
        return "lora" if head == "verbalizer" else linear_default
    if head == "verbalizer" and adapt == "head":
        raise MetarunError(
            "algo.head=verbalizer scores label names with the decoder itself and has no head to "
            "adapt; use algo.adapt=lora (or all, top_k, bias)"
        )
    return adapt


# The inner rate when `algo.inner_lr` is unset and LoRA adapts. Chosen on validation classes
# (BANKING77 split 01, SmolLM2, verbalizer head, 1-shot, 10 SGD steps: 1e-3 left accuracy at the
# zero-shot 31-33%, 0.1 reached 80%, 1.0 diverged to chance; docs/RESULTS.md).
LORA_INNER_LR = 0.1


def inner_rate(lr: float | None, adapt: str, otherwise: float) -> float:
    """`algo.inner_lr` (or finetune's `eval_lr`), or its default for what adapts."""
    if lr is None:
        return LORA_INNER_LR if adapt == "lora" else otherwise
    if lr < 0:
        raise MetarunError(f"algo.inner_lr={lr} must be >= 0")
    return lr


def inject_lora(model: nn.Module, r: int, alpha: int, targets: list[str]) -> None:
    """Add LoRA tensors (peft) to the `targets` linear layers (backbone.lora_targets), in
    place; they start trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1:
        raise MetarunError(f"algo.lora_r={r} must be at least 1")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
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
        param.requires_grad_("lora_" in name or trainable.get(base, trainable.get(name, False)))


def untied_input_embedding(model: nn.Module) -> str | None:
    """Name of the token embedding table, unless an output layer shares it (then every row
    matters to every prediction and the table cannot be cut to an episode's tokens)."""
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is table:
        return None
    return next((n for n, p in model.named_parameters() if p is table), None)


def adapted_names(model: nn.Module, adapt: str, top_k: int) -> list[str]:
    """Names (as in `model.named_parameters()`) of the tensors the inner loop updates."""
    if adapt not in ADAPT:
        raise MetarunError(f"algo.adapt={adapt}; use one of {', '.join(ADAPT)}")
    names = [n for n, _ in model.named_parameters()]
    if adapt == "head":
        return []
    if adapt == "all":
        return [n for n in names if "lora_" not in n]
    if adapt == "bias":
        return [n for n in names if n.endswith(".bias")]
    if adapt == "lora":
        found = [n for n in names if "lora_" in n]
        if not found:
            raise MetarunError("algo.adapt=lora but the backbone has no LoRA tensors")
        return found
    layers = transformer_layers(model)
    if not 0 < top_k <= len(layers):
        raise MetarunError(f"algo.top_k={top_k}; the backbone has {len(layers)} layers")
    keep = {id(p) for layer in layers[len(layers) - top_k :] for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in keep]
