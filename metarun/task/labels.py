"""Class labels as text: readable names, an episode's names for label-name methods (zero-shot,
prompts, the verbalizer head), and labels that differ only in case."""

from __future__ import annotations

import logging

from metarun.errors import MetarunError

log = logging.getLogger(__name__)


def readable(label: str) -> str:
    """`card_payment_wrong_exchange_rate` -> `card payment wrong exchange rate`."""
    return label.replace("_", " ").replace("-", " ").strip()


def episode_label_names(
    label_names: dict[str, str], classes: tuple[str, ...], who: str
) -> list[str]:
    """Readable names of an episode's classes, in label order (for label-name methods)."""
    if not classes:
        raise MetarunError(f"{who} needs the episode's class names")
    return [label_names.get(c) or readable(c) for c in classes]


def warn_case_only_labels(labels: list[str]) -> list[tuple[str, ...]]:
    """Labels equal but for case ("Food" and "food") are two classes: say so, naming them."""
    by_key: dict[str, list[str]] = {}
    for label in labels:
        by_key.setdefault(label.casefold(), []).append(label)
    groups = [tuple(sorted(g)) for g in by_key.values() if len(g) > 1]
    if groups:
        shown = "; ".join(" / ".join(g) for g in groups[:5])
        log.warning("%d groups of labels differ only in case and are separate classes: %s%s; "
                    "if each group is one class, give its rows one spelling", len(groups), shown,
                    "; ..." if len(groups) > 5 else "")  # fmt: skip
    return groups
