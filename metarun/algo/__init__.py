"""Algorithms, built from `cfg.algo` by its `_target_`: the trainer never names one.

`_target_` is the one place a config names code, so it is resolved to a class and checked
before anything is called: only a subclass of `Algorithm` (metarun's own, or a user's named
explicitly) is built, and its other keys are passed as plain values, never instantiated. Hydra's
`instantiate` would call any importable function a shared YAML or an override names.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun.algo.base import Algorithm, Predictor
from metarun.backbone import Encoder
from metarun.checks import closest
from metarun.errors import MetarunError


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


def algorithm_config(cfg: Any, cls: type[Algorithm]) -> Any:
    """The algorithm's options as an instance of `cls.config`, from the composed `algo` node
    (a DictConfig) or a dataclass; an unknown or missing key is one error naming it."""
    schema = cls.config
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise MetarunError(
            f"{cls.__name__} declares no options schema: set `config = <a dataclass>` on the "
            "class (its fields are the algo.* keys)"
        )
    if isinstance(cfg, schema):
        return cfg
    if isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True)
    else:
        values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    assert isinstance(values, dict)
    values.pop("_target_", None)
    special = sorted(k for k in values if str(k).startswith("_"))
    if special:
        raise MetarunError(
            f"algo.{special[0]} is not read: an algorithm is built from its _target_ and plain "
            "values only (nothing in a config is called or instantiated)"
        )
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name != "_target_"}
    for key in values:
        if key not in fields:
            near = closest(str(key), list(fields))
            hint = f"did you mean algo.{near}?" if near else f"its options: {', '.join(fields)}"
            raise MetarunError(f"algo.{key} is not an option of {cls.__name__}; {hint}")
    for name, spec in fields.items():
        unset = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if name not in values and unset:
            raise MetarunError(f"{cls.__name__} needs algo.{name}; set it in the algo config")
    return schema(**values)


def build_algorithm(cfg: Any, encoder: Encoder, way: int, allowed: list[str] | None = None):
    """`cfg`: the composed `algo` node (or its dataclass); the class is the one `_target_`
    names, built with its typed options."""
    mapping = isinstance(cfg, DictConfig | dict)
    target = cfg.get("_target_") if mapping else getattr(cfg, "_target_", None)
    cls = algorithm_class(target, allowed)
    return cls(encoder, way, algorithm_config(cfg, cls))


__all__ = ["Algorithm", "Predictor", "algorithm_class", "algorithm_config", "build_algorithm"]
