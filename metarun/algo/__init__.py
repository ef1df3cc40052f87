"""Algorithms, built from `cfg.algo` by its `_target_`: the trainer never names one."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from metarun.algo.base import Algorithm, Predictor
from metarun.backbone import Encoder
from metarun.errors import MetarunError

KINDS = {
    "encoder": "an encoder backbone (e.g. backbone=minilm)",
    "causal_lm": "a decoder backbone (backbone=gpt2, or backbone=tiny-gpt2 in tests)",
}


def check_backbone_kind(cfg: DictConfig, encoder: Encoder) -> None:
    """Encoder-only algorithms need pooled embeddings; in-context learning needs a decoder."""
    cls = get_class(cfg._target_)
    wanted = getattr(cls, "backbone_kind", "encoder")
    have = "causal_lm" if encoder.causal_lm else "encoder"
    if wanted != have:
        raise MetarunError(
            f"algo {cls.__name__} runs on {KINDS[wanted]}, but the backbone is "
            f"{'a decoder' if have == 'causal_lm' else 'an encoder'} ({encoder.name}); "
            f"choose {KINDS[wanted]}"
        )


def build_algorithm(cfg: DictConfig, encoder: Encoder, way: int) -> Algorithm:
    check_backbone_kind(cfg, encoder)
    try:
        algo = instantiate(cfg, encoder=encoder, way=way)
    except InstantiationException as err:
        if isinstance(err.__cause__, MetarunError):  # our own message, not Hydra's wrapper
            raise err.__cause__ from None
        raise
    if not isinstance(algo, Algorithm):
        raise MetarunError(f"algo._target_={cfg._target_} is not a metarun Algorithm")
    return algo


__all__ = ["Algorithm", "Predictor", "build_algorithm"]
