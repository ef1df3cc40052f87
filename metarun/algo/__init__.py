"""Algorithms, built from `cfg.algo` by its `_target_`: the trainer never names one.

`_target_` is the one place a config names code, so it is resolved to a class and checked
before anything is called: only a subclass of `Algorithm` (metarun's own, or a user's named
explicitly) is built, and its other keys are passed as plain values, never instantiated. Hydra's
`instantiate` would call any importable function a shared YAML or an override names.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun.algo.base import Algorithm, Predictor
from metarun.backbone import Encoder
from metarun.checks import closest
from metarun.errors import MetarunError

DECODERS = "a decoder backbone (backbone=smollm2 offline, gpt2, qwen2.5-0.5b, llama-3.2-1b)"


def locate(path: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes.
    Importing runs only module code the user named; nothing found is called."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found: object = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and not module.startswith(err.name):
                raise ImportError(str(err)) from None  # the module exists, an import in it fails
            continue
        for attr in parts[cut:]:
            if not hasattr(found, attr):
                raise ImportError(f"{'.'.join(parts[:cut])} has no '{attr}'")
            found = getattr(found, attr)
        return found
    raise ImportError(f"no module named '{parts[0]}'")


def check_module_allowed(target: str, allowed: list[str]) -> None:
    """`_target_` may name metarun's modules and those listed in `algo_modules`, checked on
    the name before any import: importing a module runs its code."""
    for prefix in ("metarun", *allowed):
        if target == prefix or target.startswith(f"{prefix}."):
            return
    top = target.split(".")[0]
    raise MetarunError(
        f"algo._target_={target} is outside metarun's modules: to build your own algorithm "
        f"class, allow its module with algo_modules=[{top}] (importing it runs its code)"
    )


def algorithm_class(target: str | None, allowed: list[str] | None = None) -> type[Algorithm]:
    """The class `algo._target_` names, if it is an Algorithm; nothing of it is called.
    Only metarun's modules and `allowed` ones (config key algo_modules) are imported."""
    if not target:
        raise MetarunError("algo._target_ is missing: choose an algorithm with algo=<name>")
    check_module_allowed(target, list(allowed or []))
    try:
        cls = locate(target)
    except ImportError as err:
        raise MetarunError(
            f"algo._target_={target} cannot be imported ({str(err).splitlines()[0]})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        kind = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise MetarunError(
            f"algo._target_={target} is {kind}, not a metarun Algorithm: only subclasses of "
            "metarun.algo.Algorithm are built from a config (nothing else in it is called)"
        )
    return cls


def algorithm_kwargs(cfg: DictConfig, cls: type[Algorithm]) -> dict[str, Any]:
    """The config's keys as plain values, checked against the class's constructor."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    values.pop("_target_", None)
    special = sorted(k for k in values if str(k).startswith("_"))
    if special:
        raise MetarunError(
            f"algo.{special[0]} is not read: an algorithm is built from its _target_ and plain "
            "values only (nothing in a config is called or instantiated)"
        )
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return values
    accepted = [n for n in params if n not in ("self", "encoder", "way")]
    for key in values:
        if key not in accepted:
            near = closest(str(key), accepted)
            options = ", ".join(accepted) or "none"
            hint = f"did you mean algo.{near}?" if near else f"its options: {options}"
            raise MetarunError(f"algo.{key} is not an option of {cls.__name__}; {hint}")
    missing = [
        n for n in accepted if n not in values and params[n].default is inspect.Parameter.empty
    ]
    if missing:
        raise MetarunError(f"{cls.__name__} needs algo.{missing[0]}; set it in the algo config")
    return values


def check_backbone_kind(cls: type[Algorithm], encoder: Encoder) -> None:
    """Algorithms reading pooled features run on encoders and decoders alike; prompt-based
    ones (in-context learning, MetaICL, zero-shot prompting) need a decoder's LM head."""
    if getattr(cls, "backbone_kind", "any") == "causal_lm" and not encoder.causal_lm:
        raise MetarunError(
            f"algo {cls.__name__} scores label names with a decoder's LM head, but the backbone "
            f"is an encoder ({encoder.name}); choose {DECODERS}"
        )


def build_algorithm(
    cfg: DictConfig, encoder: Encoder, way: int, allowed: list[str] | None = None
) -> Algorithm:
    cls = algorithm_class(cfg.get("_target_"), allowed)
    kwargs = algorithm_kwargs(cfg, cls)
    check_backbone_kind(cls, encoder)
    return cls(encoder=encoder, way=way, **kwargs)


__all__ = ["Algorithm", "Predictor", "algorithm_class", "build_algorithm"]
