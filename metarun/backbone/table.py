"""The task's texts, tokenised once, and how a forward batches them (padded, in length groups
or packed): forwards gather rows by text id and never tokenise again."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarun.backbone.packing import Packed, first_position, pack
from metarun.config import BackboneConfig


class TextTable(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, cfg: BackboneConfig, special_tokens: bool):
        super().__init__()
        self.tokenizer, self.max_length = tokenizer, cfg.max_length
        self.special_tokens = special_tokens  # a decoder's prompts are built from bare texts
        self.packing, self.length_buckets = cfg.packing, cfg.length_buckets
        self.dim, self.causal = int(model.config.hidden_size), not special_tokens
        # Where each packed text's position ids start; None: this model cannot be packed.
        self.pack_start = first_position(model)
        self.texts: list[str] = []
        self.truncated_fraction = 0.0  # of the texts given to set_texts, cut at max_length
        self.register_buffer("tokens", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.long), persistent=False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              padding="longest", return_tensors="pt",
                              add_special_tokens=self.special_tokens)  # fmt: skip

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
        lengths = self.tokenizer(at_limit, add_special_tokens=self.special_tokens,
                                 return_length=True)["length"] if at_limit else []  # fmt: skip
        cut = sum(n > self.max_length for n in lengths)
        self.truncated_fraction = cut / max(len(self.texts), 1)

    def text(self, text_id: int) -> str:
        """The task's text, cut to backbone.max_length tokens like every forward reads it."""
        if int(self.lengths[text_id]) < self.max_length:
            return self.texts[text_id]
        row = self.tokens[text_id, : self.max_length]
        return self.tokenizer.decode(row, skip_special_tokens=True)

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

    def packed(
        self, ids: torch.Tensor, mask_dtype: torch.dtype | None, vocab: torch.Tensor | None = None
    ) -> Packed:
        """Texts `ids` packed into rows without padding (see packing.py); `mask_dtype`: that of
        an additive attention mask, None for a boolean one."""
        ids = ids.to(self.tokens.device)
        lengths = self.lengths[ids]
        pad = self.tokenizer.pad_token_id or 0
        tokens = self.tokens[ids, : int(lengths.max())]
        packed = pack(tokens, lengths, pad, self.pack_start, mask_dtype, causal=self.causal)
        if vocab is not None:
            packed.inputs["input_ids"] = torch.searchsorted(vocab, packed.inputs["input_ids"])
        return packed

    def local_vocab(self, ids: torch.Tensor, padding: int) -> torch.Tensor:
        """The sorted distinct token ids of texts `ids`, plus 0..`padding` so that the
        embedding's padding row keeps its index (its gradient is masked by index)."""
        tokens = self.tokens[ids.to(self.tokens.device)].flatten()
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
