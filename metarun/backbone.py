"""A Hugging Face encoder or decoder that maps text ids to pooled embeddings.

A decoder (`causal_lm`) is read through its body (the transformer under the LM head): pooled
features for every feature-reading algorithm, and hidden states that `lm_logits` turns into
next-token scores for prompt-based ones (in-context learning, the verbalizer head).

Texts are tokenised once per run. Calls may pass `params` (a dict of parameter overrides) so
inner loops run functionally over adapted weights without copying the model. During evaluation
the unadapted embeddings of every distinct text can be computed once and reused (`cached`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from metarun.config import BackboneConfig
from metarun.errors import MetarunError
from metarun.packing import PACKABLE, Packed, first_position, pack
from metarun.weights import load_pretrained

log = logging.getLogger(__name__)
POOLINGS = ("mean", "cls", "last")
TRAINABLE = ("all", "none", "top_k")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PACKING = ("auto", "always", "never")  # not on/off: YAML reads those as booleans


def second_order_attention() -> contextlib.AbstractContextManager:
    """Only PyTorch's math attention kernel has a double backward; fused kernels raise
    'derivative for aten::_scaled_dot_product_*_backward is not implemented'."""
    return sdpa_kernel([SDPBackend.MATH])


class Encoder(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling: str,
        max_length: int,
        checkpointing: bool = False,
        causal_lm: bool = False,
        name: str = "",
        length_buckets: int = 0,
        packing: str = "auto",
        lora_targets: Sequence[str] = ("query", "value"),
    ) -> None:
        super().__init__()
        if length_buckets < 0:
            raise MetarunError(f"backbone.length_buckets={length_buckets} must be >= 0")
        self.length_buckets = length_buckets
        self.causal_lm, self.name = causal_lm, name or type(model).__name__
        self.lora_targets = list(lora_targets)
        # A decoder's hidden states come from its body; adapted weights are named as in the
        # whole model ("model.layers.0...."), so the body's prefix is cut from their names.
        self.body_prefix = f"{model.base_model_prefix}." if causal_lm else ""
        self.texts: list[str] = []
        # Activation checkpointing of each encoder call (not Hugging Face's per-layer version,
        # whose recomputation would read the module's own weights instead of adapted ones).
        self.checkpointing = checkpointing
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.truncated_fraction = 0.0  # of the texts given to set_texts, cut at max_length
        if packing not in PACKING:
            raise MetarunError(f"backbone.packing={packing}; use one of {', '.join(PACKING)}")
        # Where each packed text's position ids start; None: this model cannot be packed.
        self.pack_start = first_position(model)
        if packing == "always" and self.pack_start is None:
            raise MetarunError(
                f"backbone.packing=always: {self.name} ({model.config.model_type}) cannot be "
                f"packed (supported: {', '.join(PACKABLE)}); use backbone.packing=auto or never"
            )
        self.packing = packing
        self.register_buffer("tokens", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.long), persistent=False)
        # A decoder's output-layer weight by its name in `params` (the first name of a tied
        # tensor: the input embedding's, when they share it)
        self.output_name = self._output_weight_name() if causal_lm else None
        self._cache: torch.Tensor | None = None
        self._cache_row: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # A decoder's prompts are built from bare texts: no [CLS]/[SEP]-style special tokens.
        return self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding="longest",
            return_tensors="pt",
            add_special_tokens=not self.causal_lm,
        )

    def set_texts(self, texts: Sequence[str]) -> None:
        """Tokenise every text of the task once; later calls only gather rows by id."""
        self.texts = list(texts)
        enc = self.tokenize(self.texts)
        device = self.tokens.device
        self.tokens = enc["input_ids"].to(device)
        self.lengths = enc["attention_mask"].sum(1).to(device)
        # Only texts that fill max_length can have been cut: measure those alone, untruncated
        full = self.lengths.cpu() >= self.max_length
        at_limit = [t for t, f in zip(self.texts, full.tolist(), strict=True) if f]
        lengths = self.tokenizer(at_limit, add_special_tokens=not self.causal_lm,
                                 return_length=True)["length"] if at_limit else []  # fmt: skip
        cut = sum(n > self.max_length for n in lengths)
        self.truncated_fraction = cut / max(len(self.texts), 1)

    def batch(self, ids: torch.Tensor, vocab: torch.Tensor | None = None) -> dict:
        """Model inputs of texts `ids`, padded to the longest; with `vocab` (sorted token ids,
        see `local_vocab`) token ids become positions in it, for an embedding table of its rows."""
        ids = ids.to(self.tokens.device)
        lengths = self.lengths[ids]
        width = int(lengths.max())
        input_ids = self.tokens[ids, :width]
        if vocab is not None:
            input_ids = torch.searchsorted(vocab, input_ids)
        mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
        return {"input_ids": input_ids, "attention_mask": mask.long()}

    def packed(self, ids: torch.Tensor, vocab: torch.Tensor | None = None) -> Packed:
        """Texts `ids` packed into rows without padding (see metarun/packing.py)."""
        ids = ids.to(self.tokens.device)
        lengths = self.lengths[ids]
        pad = self.tokenizer.pad_token_id or 0
        tokens = self.tokens[ids, : int(lengths.max())]
        dtype = self.additive_mask_dtype()
        packed = pack(tokens, lengths, pad, self.pack_start, dtype, causal=self.causal_lm)
        if vocab is not None:
            packed.inputs["input_ids"] = torch.searchsorted(vocab, packed.inputs["input_ids"])
        return packed

    def additive_mask_dtype(self) -> torch.dtype | None:
        """The dtype of an additive 4D mask where attention is eager; None where it takes a
        boolean one (SDPA)."""
        if self.model.config._attn_implementation != "eager":
            return None
        return next(self.model.parameters()).dtype

    def local_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """The sorted distinct token ids of texts `ids`, plus 0..padding_idx so that the
        embedding's padding row keeps its index (its gradient is masked by index)."""
        tokens = self.tokens[ids.to(self.tokens.device)].flatten()
        padding = getattr(self.model.get_input_embeddings(), "padding_idx", None) or 0
        fixed = torch.arange(padding + 1, device=tokens.device)
        return torch.unique(torch.cat([fixed, tokens]))

    def length_groups(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Positions of `ids` in groups of similar length, so that little of each forward is
        padding (about 40% of an ICD-10 episode's tokens otherwise). Groups keep at least 8
        texts; `length_buckets` 0 picks what scripts/bench.py measured as fastest."""
        buckets = self.length_buckets or self.auto_buckets()
        groups = min(buckets, len(ids) // 8)
        if groups <= 1:
            return [torch.arange(len(ids), device=ids.device)]
        order = torch.argsort(self.lengths[ids.to(self.lengths.device)], stable=True)
        return list(order.to(ids.device).tensor_split(groups))

    def flop_bound(self) -> bool:
        """Whether removing padding pays: on CPU for models of hidden size >= 256 (MiniLM's MAML
        runs 1.2x faster in 2 length groups, 1.5x faster packed), not on GPU, where an
        episode's batch costs kernel launches rather than FLOPs, nor for narrower models, which
        spend their time in per-operator overhead (the 32-wide tiny BERT's MAML: 1.4x slower in
        groups, 1.5x slower packed)."""
        return self.tokens.device.type != "cuda" and self.dim >= 256

    def packs(self) -> bool:
        """Whether forwards pack texts: `backbone.packing` always, or auto where it pays."""
        if self.pack_start is None or self.packing == "never":
            return False
        return self.packing == "always" or self.flop_bound()

    def auto_buckets(self) -> int:
        """Unpacked models: 2 length groups where removing padding pays (3 make matmuls too
        small to pay off), else 1."""
        return 2 if self.flop_bound() else 1

    def forward(
        self,
        ids: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings [n, dim] of texts `ids`, optionally with overridden parameters
        (`vocab`: the rows of an overridden input embedding table, as in `batch`)."""
        if params is None and self._cache is not None:
            rows = self._cache_row[ids.to(self._cache_row.device)]
            if bool((rows < 0).any()):
                raise RuntimeError("text id outside the evaluation cache")
            return self._cache[rows]
        if self.packs():
            packed = self.packed(ids, vocab)
            return packed.pool(self.hidden(packed.inputs, params), self.pooling)
        groups = self.length_groups(ids)
        if len(groups) == 1:
            return self.embed(self.batch(ids, vocab), params)
        parts = [self.embed(self.batch(ids[g], vocab), params) for g in groups]
        inverse = torch.argsort(torch.cat(groups))
        return torch.cat(parts)[inverse.to(parts[0].device)]

    def encode_texts(self, texts: Sequence[str], params: dict | None = None) -> torch.Tensor:
        """Pooled embeddings of texts outside the task's table (label names, templates)."""
        enc = self.tokenize(texts)
        device = self.tokens.device
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
        body = self.model.base_model if self.causal_lm else self.model
        if params:
            cut = len(self.body_prefix)
            own = {k[cut:]: v for k, v in params.items() if k.startswith(self.body_prefix)}
            out = functional_call(body, own, args=(), kwargs=inputs, strict=False)
        else:
            out = body(**inputs)
        return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """A decoder's next-token logits from hidden states, with the output layer's adapted
        weight when `params` has it (a tied table adapted as the input embedding, say)."""
        head = self.model.get_output_embeddings()
        weight = params.get(self.output_name, head.weight) if params else head.weight
        return torch.nn.functional.linear(hidden, weight, getattr(head, "bias", None))

    def _output_weight_name(self) -> str:
        weight = self.model.get_output_embeddings().weight
        return next(n for n, p in self.model.named_parameters() if p is weight)

    def _hidden_math(self, inputs: dict, params: dict | None) -> torch.Tensor:
        """The checkpointed forward. Recomputation happens during backward, outside any caller's
        context, so everything it depends on is inside: the adapted `params` (a closure, not the
        module's weights) and the math attention kernel (the one with a double backward)."""
        with second_order_attention():
            return self._hidden(inputs, params)

    @contextmanager
    def cached(self, ids: torch.Tensor, batch_size: int = 256) -> Iterator[None]:
        """Within the block, unadapted calls return precomputed embeddings of `ids`.

        Valid because the encoder's own parameters do not change inside the block: adapted
        weights always arrive as `params`, and those calls bypass the cache. Under autograd
        (training) the rows keep their graph, so gradients reach the one shared forward.
        """
        ids = torch.unique(ids.to(self.tokens.device))
        ids = ids[torch.argsort(self.lengths[ids])]  # similar lengths per batch: little padding
        chunks = []
        for start in range(0, len(ids), batch_size):
            chunks.append(self(ids[start : start + batch_size]))
        row = torch.full((len(self.tokens),), -1, dtype=torch.long, device=self.tokens.device)
        row[ids] = torch.arange(len(ids), device=row.device)
        self._cache, self._cache_row = torch.cat(chunks), row
        try:
            yield
        finally:
            self._cache = self._cache_row = None


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the ModuleList as long as the model has layers."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise MetarunError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def set_trainable(model: nn.Module, trainable: str, top_k: int) -> None:
    if trainable not in TRAINABLE:
        raise MetarunError(f"backbone.trainable={trainable}; use one of {', '.join(TRAINABLE)}")
    model.requires_grad_(trainable == "all")
    if trainable == "top_k":
        layers = transformer_layers(model)
        if not 0 < top_k <= len(layers):
            raise MetarunError(f"backbone.top_k={top_k}; the model has {len(layers)} layers")
        for layer in layers[len(layers) - top_k :]:
            layer.requires_grad_(True)


def check_pooling(cfg: BackboneConfig) -> None:
    """A decoder's first token sees only itself, and an encoder's last real token is [SEP]:
    each pooling fits one family."""
    if cfg.pooling not in POOLINGS:
        raise MetarunError(f"backbone.pooling={cfg.pooling}; use one of {', '.join(POOLINGS)}")
    if cfg.causal_lm and cfg.pooling == "cls":
        raise MetarunError(
            "backbone.pooling=cls reads a decoder's first token, which sees only itself; "
            "use backbone.pooling=last or mean for a decoder"
        )
    if not cfg.causal_lm and cfg.pooling == "last":
        raise MetarunError(
            "backbone.pooling=last is for decoders (the token that has read the whole text); "
            "use backbone.pooling=mean or cls for an encoder"
        )


def load_backbone(cfg: BackboneConfig) -> Encoder:
    check_pooling(cfg)
    if cfg.dtype not in DTYPES:
        raise MetarunError(f"backbone.dtype={cfg.dtype}; use one of {', '.join(DTYPES)}")
    model, tokenizer = load_pretrained(cfg)
    model = model.to(DTYPES[cfg.dtype])
    set_trainable(model, cfg.trainable, cfg.top_k)
    name = Path(cfg.gguf_file).stem if cfg.gguf_file else Path(cfg.path).name
    name = f"random {model.config.model_type}" if cfg.random_init else name
    return Encoder(model, tokenizer, cfg.pooling, cfg.max_length, cfg.gradient_checkpointing,
                   cfg.causal_lm, name, cfg.length_buckets, cfg.packing,
                   cfg.lora_targets)  # fmt: skip
