"""Checks of a composed config before anything loads: keys that exist, values in range.

Hydra and the typed schemas catch a wrong type; these catch what types cannot: a key added with
`+` that no code reads, a negative learning rate, an episode of one class. Each error names the
key and what it accepts, so the fix is in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun import config as schemas
from metarun.errors import MetarunError

# Allowed ranges, by dotted key; keys absent from a config (another algorithm's) are skipped.
# (bound, comparison, its words); None values are the schema's "unset" and are not checked.
AT_LEAST, ABOVE = (operator.ge, ">="), (operator.gt, ">")
AT_MOST, BELOW = (operator.le, "<="), (operator.lt, "<")
Limit = tuple[float, tuple[Callable[[Any, Any], bool], str]]
LIMITS: dict[str, Limit | list[Limit]] = {
    # seeds feed numpy's generators, which take unsigned 32-bit integers
    "seed": [(0, AT_LEAST), (2**32, BELOW)],
    "task.eval_seed": [(0, AT_LEAST), (2**32, BELOW)],
    "task.split_seed": [(0, AT_LEAST), (2**32, BELOW)],
    "task.way": (2, AT_LEAST),
    "task.shots": (1, AT_LEAST),
    "task.queries": (1, AT_LEAST),
    # one episode has no confidence interval; the fixed episodes are all drawn and held before
    # evaluation, so a count past 100,000 (a typo such as 1e8) would fill memory
    "task.test_episodes": [(2, AT_LEAST), (100_000, AT_MOST)],
    "train.steps": (0, AT_LEAST),
    "train.meta_batch_size": (1, AT_LEAST),
    "train.episodes_per_backward": (1, AT_LEAST),
    "train.lr": (0, ABOVE),
    "train.weight_decay": (0, AT_LEAST),
    "train.warmup_steps": (0, AT_LEAST),
    "train.grad_clip": (0, AT_LEAST),
    "train.val_interval": (1, AT_LEAST),
    "train.patience": (0, AT_LEAST),
    "train.checkpoint_interval": (0, AT_LEAST),
    "train.contrastive_steps": (0, AT_LEAST),
    "train.contrastive_classes": (2, AT_LEAST),
    "train.contrastive_per_class": (2, AT_LEAST),  # a text needs a same-class pair
    "train.contrastive_temperature": (0, ABOVE),
    "backbone.max_length": (8, AT_LEAST),  # below it a text is a few word pieces
    "backbone.top_k": (1, AT_LEAST),
    "backbone.length_buckets": (0, AT_LEAST),
    "hardware.threads": (0, AT_LEAST),
    "hardware.episode_batch": (1, AT_LEAST),
    "algo.inner_steps": (1, AT_LEAST),  # zero steps is no adaptation: use algo=protonet/frozen
    "algo.eval_inner_steps": (0, AT_LEAST),  # 0: the verbalizer head only (check_head)
    "algo.inner_lr": (0, ABOVE),
    "algo.eval_steps": (0, AT_LEAST),
    "algo.eval_lr": (0, ABOVE),
    "algo.head_lr": (0, ABOVE),
    "algo.top_k": (1, AT_LEAST),
    "algo.adapt_layers": (0, AT_LEAST),
    "algo.lora_r": (1, AT_LEAST),
    "algo.lora_alpha": (0, ABOVE),
    "algo.temperature": (0, ABOVE),
    "algo.hidden": (1, AT_LEAST),
    "algo.lam": (0, ABOVE),
    "algo.scale": (0, ABOVE),
    "algo.c": (0, ABOVE),
    "algo.max_iter": (1, AT_LEAST),
    "algo.transductive_steps": (0, AT_LEAST),
    "algo.batch_size": (1, AT_LEAST),
}
# Needed only when the run trains (train.steps or train.contrastive_steps > 0): validation picks
# the checkpoint.
WHEN_TRAINING: dict[str, Limit | list[Limit]] = {
    "task.val_episodes": [(2, AT_LEAST), (100_000, AT_MOST)]
}


def closest(word: str, options: list[str]) -> str | None:
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_message(path: str, fields: list[str]) -> str:
    """`train.stepz is not a key of train; did you mean train.steps?`"""
    parent, _, key = path.rpartition(".")
    where = parent or "the config"
    near = closest(key, fields)
    hint = f"did you mean {parent + '.' if parent else ''}{near}?" if near else (
        f"its keys are: {', '.join(sorted(fields))}"
    )  # fmt: skip
    return f"{path} is not a key of {where}; {hint} (`metarun --cfg job` prints every key)"


def schema_fields(schema_name: str) -> list[str] | None:
    """The fields of a schema class named in one of Hydra's messages ('TrainConfig')."""
    cls = getattr(schemas, schema_name, None)
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return None


def schema_keys(node: DictConfig, prefix: str = "") -> Iterator[tuple[DictConfig, type, str, str]]:
    """(node, its schema, key, dotted path) for every key of every schema-backed node, depth
    first in key order. A free-form node (backbone.arch) or a user's own algorithm has no
    schema: checked elsewhere."""
    cls = OmegaConf.get_type(node)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return
    for key in node:
        yield node, cls, str(key), f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from schema_keys(child, f"{prefix}{key}.")


def check_keys(cfg: DictConfig) -> None:
    """Every key of a schema-backed node is a field of its schema: a key added with `+` (or by
    a shared YAML) would otherwise be dropped without a word, typo included."""
    for _, cls, key, path in schema_keys(cfg):
        fields = [f.name for f in dataclasses.fields(cls)]
        if key not in fields:
            raise MetarunError(unknown_key_message(path, fields))


def check_choices(cfg: DictConfig) -> None:
    """Every option with a fixed set of values (`config.choice`) holds one of them."""
    for node, cls, key, path in schema_keys(cfg):
        spec = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        allowed = spec.metadata.get(schemas.CHOICES) if spec else None
        if allowed and not node._get_node(key)._is_missing() and node[key] not in allowed:
            raise MetarunError(f"{path}={node[key]}; use one of {', '.join(allowed)}")


def check_pooling(cfg: DictConfig) -> None:
    """A decoder's first token sees only itself, and an encoder's last real token is [SEP]:
    each pooling fits one family."""
    pooling, decoder = _value(cfg, "backbone.pooling"), _value(cfg, "backbone.causal_lm")
    if decoder and pooling == "cls":
        raise MetarunError(
            "backbone.pooling=cls reads a decoder's first token, which sees only itself; "
            "use backbone.pooling=last or mean for a decoder"
        )
    if decoder is False and pooling == "last":
        raise MetarunError(
            "backbone.pooling=last is for decoders (the token that has read the whole text); "
            "use backbone.pooling=mean or cls for an encoder"
        )


def check_prompt(cfg: DictConfig) -> None:
    """An algorithm's prompt (instruction, template, separator) parses before any model loads;
    the rules are the prompt format's own."""
    algo = cfg.get("algo")
    if isinstance(algo, DictConfig) and {"instruction", "template", "separator"} <= set(algo):
        from metarun.backbone.prompts import PromptFormat

        PromptFormat(algo.instruction, algo.template, algo.separator)


def check_head(cfg: DictConfig) -> None:
    """algo.head names a registered head (metarun/algo/heads: a new head adds its name there,
    so the schema does not list them). Zero evaluation steps are no adaptation: meaningful for
    the verbalizer (what trained weights score before any support set), not a fresh head."""
    head = _value(cfg, "algo.head")
    if head is not None:
        from metarun.algo.heads import head_class

        head_class(head)
    for key in ("algo.eval_steps", "algo.eval_inner_steps"):
        if _value(cfg, key) == 0 and head != "verbalizer":
            raise MetarunError(
                f"{key}=0 leaves each episode's head as it starts, which knows none of the "
                "episode's classes; zero steps suits only algo.head=verbalizer (the weights read "
                "as a prompt); use 1 or more, or algo=protonet/frozen for no adaptation"
            )


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check_values(cfg: DictConfig) -> None:
    trains = (_value(cfg, "train.steps") or 0) + (_value(cfg, "train.contrastive_steps") or 0)
    limits = LIMITS | (WHEN_TRAINING if trains > 0 else {})
    for key, bounds in limits.items():
        value = _value(cfg, key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        for bound, (ok, words) in bounds if isinstance(bounds, list) else [bounds]:
            if (isinstance(value, float) and not math.isfinite(value)) or not ok(value, bound):
                raise MetarunError(f"{key}={value} is out of range: it must be {words} {bound}")


def check_config(cfg: DictConfig) -> None:
    """Refuse unknown keys, values outside their choices or ranges, and combinations that
    cannot work, before any data or model loads."""
    check_keys(cfg)
    check_choices(cfg)
    check_values(cfg)
    check_pooling(cfg)
    check_prompt(cfg)
    check_head(cfg)
