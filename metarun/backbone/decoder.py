"""A decoder LM as a backbone: pooled features of its body (the transformer under the LM head)
for feature-reading algorithms, and next-token scores (`lm_logits`) for prompt-based ones
(in-context learning, the verbalizer head). Texts carry no special tokens: prompts are built
from bare texts."""

from __future__ import annotations

import torch
from torch import nn

from metarun.backbone.encoder import Encoder
from metarun.config import BackboneConfig


class Decoder(Encoder):
    causal_lm = True
    special_tokens = False
    # The frozen output weight in bf16, read under bf16 autocast instead of casting it at every
    # call (backbone/lowp.py); None: not made (fp32, or the weight trains or adapts).
    output_low: torch.Tensor | None = None

    def __init__(self, model: nn.Module, tokenizer, cfg: BackboneConfig, name: str = "") -> None:
        super().__init__(model, tokenizer, cfg, name)
        # Adapted weights are named as in the whole model ("model.layers.0...."): the body's
        # prefix is cut from their names.
        self.body_prefix = f"{model.base_model_prefix}."
        # The output layer's weight by its name in `params` (the first name of a tied tensor:
        # the input embedding's, when they share it)
        weight = model.get_output_embeddings().weight
        self.output_name = next(n for n, p in model.named_parameters() if p is weight)

    @property
    def body(self) -> nn.Module:
        return self.model.base_model

    def lm_logits(self, hidden: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Next-token logits from hidden states, with the output layer's adapted weight when
        `params` has it (a tied table adapted as the input embedding, say); under bf16 autocast
        the frozen weight's bf16 copy, which is what autocast would cast it to."""
        head = self.model.get_output_embeddings()
        if params and self.output_name in params:
            weight = params[self.output_name]
        elif self.output_low is not None and autocast_bf16(hidden.device.type):
            weight = self.output_low
        else:
            weight = head.weight
        return torch.nn.functional.linear(hidden, weight, getattr(head, "bias", None))


def autocast_bf16(device_type: str) -> bool:
    return (
        torch.is_autocast_enabled(device_type)
        and torch.get_autocast_dtype(device_type) == torch.bfloat16
    )
