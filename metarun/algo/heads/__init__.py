"""Heads: how an inner loop turns (adapted) weights into class scores for an episode.

A head is built once from `algo.head` and gives the inner loop four things: the tensors it adds
to the adapted weights (`start`), the class scores of some examples under adapted weights
(`scores`; `scores_many` for several episodes at once where `batches`), whether the
input-embedding table may be cut to an episode's tokens (`cuts_table`), and what
`algo.adapt=auto` means under it (`default_adapt`); fine-tuning also asks it for its training
objective (`objective`). The inner loop, the algorithms and the trainer never ask which head
they hold; a new head is one file here plus its name below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from metarun.algo.heads.linear import LinearHead
from metarun.algo.heads.verbalizer import VerbalizerHead
from metarun.backbone import Encoder
from metarun.config import InnerLoopFields
from metarun.errors import MetarunError
from metarun.task import Examples, TaskData


class Head(Protocol):
    names: tuple[str, ...]  # the head's own entries in the adapted weights
    cuts_table: bool  # whether scores read only the episode's tokens from the embedding table
    # whether `scores_many` scores several episodes (own LoRA factors) at once; a head that
    # leaves it out (written before it existed) is scored one episode at a time
    batches: bool
    default_adapt: str | None  # algo.adapt=auto under this head; None: the algorithm's choice
    no_head: str  # why algo.adapt=head cannot work ("" when it can)

    def prepare(self, data: TaskData) -> None: ...

    def start(
        self, encoder: Encoder, support: Examples, way: int, track: bool,
        adapts_encoder: bool, like: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]: ...  # fmt: skip

    def scores(
        self, encoder: Encoder, examples: Examples, params: dict[str, torch.Tensor],
        vocab: torch.Tensor | None = None, feats: torch.Tensor | None = None,
    ) -> torch.Tensor: ...  # fmt: skip

    def scores_many(
        self, encoder: Encoder, parts: Sequence[Examples], params: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]: ...

    def initial(self, name: str) -> torch.Tensor | None: ...

    def objective(self, encoder: Encoder, data: TaskData) -> nn.Module: ...


HEADS: dict[str, type] = {"linear": LinearHead, "verbalizer": VerbalizerHead}


def head_class(name: str) -> type:
    if name not in HEADS:
        raise MetarunError(f"algo.head={name}; use one of {', '.join(HEADS)}")
    return HEADS[name]


def resolve_adapt(adapt: str, head: str, otherwise: str) -> str:
    """`algo.adapt=auto`: the head's own choice (LoRA under the verbalizer: a decoder's weights
    are its classifier), else the algorithm's `otherwise`. A head with no tensors of its own
    cannot be the only thing adapted."""
    cls = head_class(head)
    if adapt == "auto":
        return cls.default_adapt or otherwise
    if adapt == "head" and cls.no_head:
        raise MetarunError(
            f"algo.head={head} {cls.no_head} and has no head to adapt; use algo.adapt=lora "
            "(or all, top_k, bias)"
        )
    return adapt


def build_head(encoder: Encoder, way: int, cfg: InnerLoopFields) -> Head:
    return head_class(cfg.head)(encoder, way, cfg)


__all__ = [
    "HEADS",
    "Head",
    "LinearHead",
    "VerbalizerHead",
    "build_head",
    "head_class",
    "resolve_adapt",
]
