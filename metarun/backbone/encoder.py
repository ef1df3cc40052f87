"""A Hugging Face encoder as a text-id -> pooled-embedding function over adapted weights.

Calls may pass `params` (a dict of parameter overrides) so inner loops run functionally over
adapted weights without copying the model. The task's texts live in a `TextTable` (tokenised
once); within `cached` the unadapted embeddings of a block's texts are computed once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from metarun.backbone.bottom import FrozenBottom, has_dropout, replayable, transformer_layers
from metarun.backbone.cache import EmbeddingCache
from metarun.backbone.packing import PACKABLE
from metarun.backbone.table import TextTable
from metarun.config import BackboneConfig
from metarun.errors import MetarunError

LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses and heads in at least float32; float64 stays float64 (gradient checks)."""
    return t.float() if t.dtype in LOW_PRECISION else t


def second_order_attention() -> contextlib.AbstractContextManager:
    """Only PyTorch's math attention kernel has a double backward; fused kernels raise
    'derivative for aten::_scaled_dot_product_*_backward is not implemented'."""
    return sdpa_kernel([SDPBackend.MATH])


class Encoder(nn.Module):
    causal_lm = False  # a decoder (Decoder) reads label names with its LM head
    special_tokens = True  # [CLS] / [SEP]-style tokens around each text

    def __init__(self, model: nn.Module, tokenizer, cfg: BackboneConfig, name: str = "") -> None:
        super().__init__()
        self.name = name or type(model).__name__
        # The linear layers LoRA adapts (backbone.lora_targets)
        self.lora_targets = list(cfg.lora_targets)
        # Activation checkpointing of each encoder call (not Hugging Face's per-layer version,
        # whose recomputation would read the module's own weights instead of adapted ones).
        self.checkpointing = cfg.gradient_checkpointing
        self.model, self.tokenizer, self.pooling = model, tokenizer, cfg.pooling
        self.max_length = cfg.max_length
        self.table = TextTable(model, tokenizer, cfg, self.special_tokens)
        self.bottom: FrozenBottom | None = None  # within frozen_below: the saved lower blocks
        if cfg.packing == "always" and self.table.pack_start is None:
            raise MetarunError(
                f"backbone.packing=always: {self.name} ({model.config.model_type}) cannot be "
                f"packed (supported: {', '.join(PACKABLE)}); use backbone.packing=auto or never"
            )
        self.cache = EmbeddingCache()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.table.tokens.device

    @property
    def body(self) -> nn.Module:
        """The module whose last hidden states are pooled."""
        return self.model

    body_prefix = ""  # the body's prefix in the whole model's parameter names

    def set_texts(self, texts: Sequence[str]) -> None:
        self.table.set_texts(texts)

    def additive_mask_dtype(self) -> torch.dtype | None:
        """The dtype of an additive 4D mask where attention is eager; None where it takes a
        boolean one (SDPA)."""
        if self.model.config._attn_implementation != "eager":
            return None
        return next(self.model.parameters()).dtype

    def local_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """The sorted distinct token ids of texts `ids` (and the padding row's index)."""
        padding = getattr(self.model.get_input_embeddings(), "padding_idx", None) or 0
        return self.table.local_vocab(ids, padding)

    def forward(
        self,
        ids: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings [n, dim] of texts `ids`, optionally with overridden parameters
        (`vocab`: the rows of an overridden input embedding table, as in `TextTable.batch`)."""
        if params is None and (hit := self.cache.lookup(ids)) is not None:
            return hit
        table = self.table
        if table.packs():
            packed = table.packed(ids, self.additive_mask_dtype(), vocab)
            return packed.pool(self.hidden(packed.inputs, params), self.pooling)
        groups = table.length_groups(ids)
        if len(groups) == 1:
            return self.embed(table.batch(ids, vocab), params)
        parts = [self.embed(table.batch(ids[g], vocab), params) for g in groups]
        inverse = torch.argsort(torch.cat(groups))
        return torch.cat(parts)[inverse.to(parts[0].device)]

    def cached(self, ids: torch.Tensor) -> contextlib.AbstractContextManager:
        """Within the block, unadapted calls return precomputed embeddings of texts `ids`."""
        return self.cache.filled(self, ids, self.table.lengths)

    def encode_texts(self, texts: Sequence[str], params: dict | None = None) -> torch.Tensor:
        """Pooled embeddings of texts outside the task's table (label names, templates)."""
        enc = self.table.tokenize(texts)
        device = self.device
        inputs = {"input_ids": enc["input_ids"].to(device),
                  "attention_mask": enc["attention_mask"].to(device)}  # fmt: skip
        return self.embed(inputs, params)

    def hidden(self, inputs: dict[str, torch.Tensor], params: dict | None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._hidden_math, inputs, params, use_reentrant=False)
        return self._hidden(inputs, params)

    def embed(self, inputs: dict[str, torch.Tensor], params: dict | None) -> torch.Tensor:
        """Pooled embeddings of a right-padded batch (`attention_mask` 2D)."""
        hidden = self.hidden(inputs, params)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = inputs["attention_mask"].sum(1) - 1
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def _hidden(self, inputs: dict, params: dict | None) -> torch.Tensor:
        body, cut = self.body, len(self.body_prefix)
        own = {k[cut:]: v for k, v in (params or {}).items() if k.startswith(self.body_prefix)}
        if self.bottom is not None:
            return self.bottom.hidden(inputs, own)
        if own:
            return functional_call(
                body, own, args=(), kwargs=inputs, strict=False
            ).last_hidden_state
        return body(**inputs).last_hidden_state

    @contextlib.contextmanager
    def frozen_below(self, split: int, keep_graph: bool) -> Iterator[None]:
        """Within the block, blocks below `split` run once per distinct input (nothing below it
        may adapt): see bottom.py. Nothing is saved where that would not be exact: dropout
        active in training, activation checkpointing (whose recomputation replays), or an
        architecture whose blocks take different arguments."""
        dropout = self.model.training and has_dropout(self.model)
        if split <= 0 or self.checkpointing or dropout or not replayable(self.model):
            yield
            return
        layers = transformer_layers(self.model)
        self.bottom = FrozenBottom(self.body, layers, split, keep_graph)
        try:
            yield
        finally:
            self.bottom = None

    def _hidden_math(self, inputs: dict, params: dict | None) -> torch.Tensor:
        """The checkpointed forward. Recomputation happens during backward, outside any caller's
        context, so everything it depends on is inside: the adapted `params` (a closure, not the
        module's weights) and the math attention kernel (the one with a double backward)."""
        with second_order_attention():
            return self._hidden(inputs, params)
