"""The one interface every algorithm implements; the trainer and evaluator know nothing else.

- `meta_loss(episodes)` -> (scalar loss, metrics): what the outer optimiser minimises.
- `adapt(support, way)` -> predictor: a callable from query examples to logits [n, way].

Adapted weights must be passed to the encoder as `params` (functional), never written into the
module: evaluation relies on the encoder's own weights being constant to reuse embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.backbone import Encoder
from metarun.task import Episode, Examples

Predictor = Callable[[Examples], torch.Tensor]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses and heads in at least float32; float64 stays float64 (gradient checks)."""
    return t.float() if t.dtype in LOW_PRECISION else t


class Algorithm(nn.Module):
    # Whether evaluation may precompute the unadapted encoder's embeddings of every test text.
    # Algorithms whose predictions come from adapted encoder weights set it False.
    eval_feature_cache: bool = True

    def __init__(self, encoder: Encoder, way: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.way = way

    def adapt(self, support: Examples, way: int) -> Predictor:
        raise NotImplementedError

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        """Default: mean query cross-entropy after adapting on each episode's support set."""
        losses, correct, total = [], 0, 0
        for ep in episodes:
            logits = self.adapt(ep.support, ep.way)(ep.query)
            labels = ep.query.labels.to(logits.device)
            losses.append(F.cross_entropy(upcast(logits), labels))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        loss = torch.stack(losses).mean()
        return loss, {"loss": float(loss.detach()), "acc": correct / total}
