"""Frozen linear weights stored in bf16 once, instead of cast at every call.

Under bf16 autocast every `linear` casts its weight to bf16 first. Autocast caches that cast
only for leaf tensors that require a gradient, so a frozen weight (a LoRA base layer, a frozen
encoder, in-context learning) is cast again at every forward, inner step and query batch: on a
CPU the copies took 9% of a SmolLM2 LoRA-verbalizer episode. Storing those weights in bf16
computes exactly what autocast computed (the same rounding, the same bf16 matmul) without the
copies. Weights that train (LoRA factors among them), adapt per episode, or are shared with
another module (a tied input embedding, which runs outside autocast) stay as they are, and
checkpoints hold only trained weights, so nothing saved changes.

A decoder's output layer is the largest of them (SmolLM2: 49,152 x 576) and is cast at every
label scoring, 6% of a LoRA-verbalizer episode. It is usually tied to the input embedding, which
must keep its float32, so a frozen output layer gets a bf16 copy beside it instead, read only
under bf16 autocast (`Decoder.lm_logits`): vocabulary x hidden x 2 bytes more memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch
from torch import nn

from metarun.backbone.bottom import transformer_layers
from metarun.backbone.encoder import Encoder


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


def output_layer_in_bf16(encoder: Encoder, keep: Collection[str]) -> int:
    """Gives a decoder (an encoder with `output_name`) a bf16 copy of its output layer's weight
    when that weight is frozen, float32 and not adapted (`keep`); returns 1 if it did."""
    name = getattr(encoder, "output_name", None)
    if name is None or name in keep:
        return 0
    weight = encoder.model.get_output_embeddings().weight
    if weight.requires_grad or weight.dtype != torch.float32:
        return 0
    encoder.output_low = weight.detach().to(torch.bfloat16)
    return 1
