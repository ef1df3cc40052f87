"""Building a backbone from its config: weights (hub, local folder, random, GGUF), dtype, which
parameters train, and the Encoder or Decoder around them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metarun.backbone.bottom import transformer_layers
from metarun.backbone.decoder import Decoder
from metarun.backbone.encoder import Encoder
from metarun.backbone.weights import load_pretrained
from metarun.config import BackboneConfig
from metarun.errors import MetarunError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def set_trainable(model: nn.Module, trainable: str, top_k: int) -> None:
    """backbone.trainable: all, none, or the last `top_k` blocks."""
    model.requires_grad_(trainable == "all")
    if trainable == "top_k":
        layers = transformer_layers(model)
        if not 0 < top_k <= len(layers):
            raise MetarunError(f"backbone.top_k={top_k}; the model has {len(layers)} layers")
        for layer in layers[len(layers) - top_k :]:
            layer.requires_grad_(True)


def load_backbone(cfg: BackboneConfig) -> Encoder:
    model, tokenizer = load_pretrained(cfg)
    model = model.to(DTYPES[cfg.dtype])
    set_trainable(model, cfg.trainable, cfg.top_k)
    name = Path(cfg.gguf_file).stem if cfg.gguf_file else Path(cfg.path).name
    name = f"random {model.config.model_type}" if cfg.random_init else name
    return (Decoder if cfg.causal_lm else Encoder)(model, tokenizer, cfg, name)
