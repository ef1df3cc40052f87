"""Algorithms, built from `cfg.algo` by its `_target_`: the trainer never names one."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from metarun.algo.base import Algorithm, Predictor
from metarun.backbone import Encoder
from metarun.errors import MetarunError


def build_algorithm(cfg: DictConfig, encoder: Encoder, way: int) -> Algorithm:
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
