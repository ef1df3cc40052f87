"""The setting a number was made in, read from a run's config: what a reviewer must see beside
an accuracy before comparing it with another (a transductive method sees every query of its
episode; one that reads class names knows more than one that does not; extra data is extra
supervision; a bigger backbone is another model).

Derived, never declared: transductive when the algorithm refines its classifier with the
episode's queries (ProtoNet's `algo.transductive_steps`); class names when they join the
support sets (`task.names_as_examples`) or the method scores them (a decoder's verbalizer
head, in-context learning, MetaICL, zero-shot prompting and label-name matching). metarun
uses no unlabelled or augmented data, so its runs say "none"; published rows say theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Algorithms that score the classes' names by construction (their _target_'s class name).
READS_NAMES = ("InContext", "ZeroShot")
# Parameters of the shipped backbones, for runs whose summary predates `backbone_params`.
KNOWN_SIZES = {"minilm": 22.7e6, "smollm2": 134.5e6, "bert-base": 110e6, "distilbert": 66e6,
               "roberta-base": 125e6, "gpt2": 124e6, "qwen2.5-0.5b": 494e6,
               "llama-3.2-1b": 1236e6}  # fmt: skip


@dataclass(frozen=True)
class Setting:
    transductive: bool
    names: bool
    extra_data: str = "none"  # none | unlabelled | augmentation (or both, for published rows)

    def __str__(self) -> str:
        kind = "transductive" if self.transductive else "inductive"
        names = "class names" if self.names else "no names"
        return f"{kind}, {names}, extra data: {self.extra_data}"


INDUCTIVE = Setting(False, False)


def run_setting(config: dict[str, Any]) -> Setting:
    algo = config.get("algo") or {}
    task = config.get("task") or {}
    target = str(algo.get("_target_", "")).rsplit(".", 1)[-1]
    transductive = int(algo.get("transductive_steps") or 0) > 0
    names = bool(task.get("names_as_examples")) or algo.get("head") == "verbalizer" or (
        target in READS_NAMES
    )  # fmt: skip
    return Setting(transductive, names)


def size_text(params: float | None) -> str:
    if not params:
        return ""
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def backbone_label(backbone: str, params: float | None) -> str:
    """`minilm (22.7M)`: the backbone and its size, from the summary or the shipped table."""
    size = size_text(params or KNOWN_SIZES.get(backbone))
    return f"{backbone} ({size})" if size else backbone
