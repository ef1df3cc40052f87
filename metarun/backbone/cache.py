"""Unadapted embeddings of a block's texts, computed once and looked up by text id.

Valid because an encoder's own parameters do not change inside the block: adapted weights
always arrive as `params`, and those calls bypass the cache. Under autograd (training) the rows
keep their graph, so gradients reach the one shared forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class EmbeddingCache:
    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self.row: torch.Tensor | None = None  # text id -> row of `values`; -1: not cached

    def lookup(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The cached embeddings of `ids`, or None outside a `filled` block."""
        if self.values is None or self.row is None:
            return None
        rows = self.row[ids.to(self.row.device)]
        if bool((rows < 0).any()):
            raise RuntimeError("text id outside the evaluation cache")
        return self.values[rows]

    @contextmanager
    def filled(
        self, embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
        lengths: torch.Tensor, batch_size: int = 256,
    ) -> Iterator[None]:  # fmt: skip
        """Within the block, `lookup` answers for `ids` (`lengths`: every text's token count,
        so that each batch holds similar lengths and little padding)."""
        ids = torch.unique(ids.to(lengths.device))
        ids = ids[torch.argsort(lengths[ids])]
        chunks = [
            embed(ids[start : start + batch_size]) for start in range(0, len(ids), batch_size)
        ]
        row = torch.full((len(lengths),), -1, dtype=torch.long, device=lengths.device)
        row[ids] = torch.arange(len(ids), device=row.device)
        self.values, self.row = torch.cat(chunks), row
        try:
            yield
        finally:
            self.values = self.row = None
