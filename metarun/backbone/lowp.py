"""Frozen linear weights stored in bf16 once, instead of cast at every call.

Under bf16 autocast every `linear` casts its weight to bf16 first. Autocast caches that cast
only for leaf tensors that require a gradient, so a frozen weight (a LoRA base layer, a frozen
encoder, in-context learning) is cast again at every forward, inner step and query batch: on a
CPU the copies took 9% of a SmolLM2 LoRA-verbalizer episode. Storing those weights in bf16
computes exactly what autocast computed (the same rounding, the same bf16 matmul) without the
copies. Weights that train (LoRA factors among them), adapt per episode, or are shared with
another module (a tied input embedding, which runs outside autocast) stay as they are, and
checkpoints hold only trained weights, so nothing saved changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch
from torch import nn

from metarun.backbone.bottom import transformer_layers


def store_frozen_in_bf16(model: nn.Module, keep: Collection[str]) -> int:
    """Casts the frozen float32 weights and biases of the linear layers inside the transformer
    blocks to bf16, except those named in `keep` (as in `model.named_parameters()`: the weights
    an inner loop adapts); returns how many tensors it cast."""
    blocks = {id(m) for layer in transformer_layers(model) for m in layer.modules()}
    shared = shared_parameters(model)
    cast = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) not in blocks:
            continue
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}"
            if param.requires_grad or full in keep or id(param) in shared:
                continue
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
                cast += 1
    return cast


def shared_parameters(model: nn.Module) -> set[int]:
    """Parameters that more than one module holds (tied weights)."""
    held = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in held.items() if count > 1}
