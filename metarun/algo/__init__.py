"""Algorithms, built from `cfg.algo` by its `_target_`: the trainer never names one."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from metarun.algo.base import Algorithm, Predictor
from metarun.backbone import Encoder
from metarun.errors import MetarunError

DECODERS = "a decoder backbone (backbone=smollm2 offline, gpt2, qwen2.5-0.5b, llama-3.2-1b)"


def check_backbone_kind(cfg: DictConfig, encoder: Encoder) -> None:
    """Algorithms reading pooled features run on encoders and decoders alike; prompt-based
    ones (in-context learning, MetaICL, zero-shot prompting) need a decoder's LM head."""
    cls = get_class(cfg._target_)
    if getattr(cls, "backbone_kind", "any") == "causal_lm" and not encoder.causal_lm:
        raise MetarunError(
            f"algo {cls.__name__} scores label names with a decoder's LM head, but the backbone "
            f"is an encoder ({encoder.name}); choose {DECODERS}"
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
