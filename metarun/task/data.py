"""A task's texts in one table, and its classes split into disjoint train / valid / test sets.

Splits come from published label files or from `task.split_seed`, never from the run seed, so
every run and every algorithm sees the same held-out classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metarun.config import TaskConfig
from metarun.errors import MetarunError
from metarun.task import sources
from metarun.task.labels import readable, warn_case_only_labels
from metarun.task.rows import FILE_TYPES

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """All texts of a task (indexed by id) and, per split, class name -> text ids."""

    texts: list[str]
    splits: dict[str, dict[str, np.ndarray]]
    label_names: dict[str, str] = field(default_factory=dict)  # class -> readable name
    dropped: dict[str, int] = field(default_factory=dict)  # split -> classes too small
    rows: dict[str, int] = field(default_factory=dict)  # what reading found (rows.RowCounts)
    # class -> the id of its readable name in `texts` (task.names_as_examples; zero-shot reads
    # names through label_names); names are texts of the table, never of a class's pool
    name_ids: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""  # of every (label, text) read, whatever the split: content_fingerprint

    def split_fingerprint(self) -> str:
        """The content and which classes each split kept: what a resumed run must find again."""
        classes = {split: sorted(c) for split, c in sorted(self.splits.items())}
        return _digest([self.fingerprint, classes])

    def summary(self) -> dict:
        return {
            split: {"classes": len(c), "texts": int(sum(len(v) for v in c.values()))}
            for split, c in self.splits.items()
        } | {"dropped_classes": self.dropped, "rows": self.rows, "fingerprint": self.fingerprint,
             "split_fingerprint": self.split_fingerprint()}  # fmt: skip


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()[:16]


def content_fingerprint(by_label: dict[str, list[str]]) -> str:
    """A short hash of every (label, text) read, independent of order and of the class split:
    two runs read the same data exactly when theirs agree, whatever the files were called
    (metarun-report groups runs by it; resume refuses other data)."""
    return _digest([[label, sorted(by_label[label])] for label in sorted(by_label)])


def seeded_class_split(labels: list[str], fractions: list[float], seed: int) -> dict[str, list]:
    """Split class names into train / valid / test by fraction with a fixed generator."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise MetarunError(
            f"task.class_split={list(fractions)} must be three positive fractions summing to 1"
        )
    order = [str(x) for x in np.random.default_rng(seed).permutation(sorted(labels))]
    n_train = round(fractions[0] * len(order))
    n_valid = round(fractions[1] * len(order))
    return {
        "train": order[:n_train],
        "valid": order[n_train : n_train + n_valid],
        "test": order[n_train + n_valid :],
    }


def _read(cfg: TaskConfig) -> tuple[dict[str, list[str]], dict[str, list] | None, dict, dict]:
    """Texts by label, the published split if any, readable label names, and row counts."""
    if cfg.source == "icd10":
        if cfg.data_dir or cfg.path:
            raise MetarunError(
                "task.source=icd10 reads the built-in ICD-10-CM data and ignores task.data_dir / "
                "task.path; for your own data use task=local (or task=banking77|clinc150)"
            )
        by_label, names = sources.read_icd10()
        return by_label, None, names, {}
    if cfg.source != "auto":
        raise MetarunError(f"task.source={cfg.source} is unknown; use auto or icd10")
    columns = (cfg.text_column, cfg.label_column)
    if cfg.data_dir is not None:
        root = Path(cfg.data_dir).expanduser()
        by_label, split, counts = sources.read_split_dir(
            root, cfg.split, *columns, "task.data_dir", cfg.encoding, cfg.on_invalid_rows
        )
        return by_label, split, {}, counts.as_dict()
    if cfg.path is None:
        raise MetarunError(
            "the task has no data: set task.path=<file.jsonl|.csv|.parquet, split-format folder "
            "or HF dataset id> or task.data_dir=<split-format folder>"
        )
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        by_label, split, counts = sources.read_split_dir(
            path, cfg.split, *columns, "task.path", cfg.encoding, cfg.on_invalid_rows
        )
        return by_label, split, {}, counts.as_dict()
    if path.is_file():
        by_label, counts = sources.read_file(path, *columns, cfg.encoding, cfg.on_invalid_rows)
        return by_label, None, {}, counts.as_dict()
    if path.suffix.lower() in FILE_TYPES or path.is_absolute() or cfg.path[0] == ".":
        raise MetarunError(f"task.path={cfg.path} does not exist; give an existing file or folder")
    by_label, counts = sources.read_hub(cfg.path, cfg.hub_config, *columns, cfg.on_invalid_rows)
    return by_label, None, {}, counts.as_dict()


def load_task(cfg: TaskConfig) -> TaskData:
    by_label, published, names, counts = _read(cfg)
    warn_case_only_labels(list(by_label))
    split = published or seeded_class_split(list(by_label), list(cfg.class_split), cfg.split_seed)
    index: dict[str, int] = {}
    splits: dict[str, dict[str, np.ndarray]] = {}
    dropped: dict[str, int] = {}
    need = cfg.shots + cfg.queries
    for name in sources.SPLIT_NAMES:
        kept: dict[str, np.ndarray] = {}
        for label in split[name]:
            pool = by_label[label]
            if len(pool) < need:
                continue
            kept[label] = np.array([index.setdefault(t, len(index)) for t in pool], dtype=np.int64)
        dropped[name] = len(split[name]) - len(kept)
        splits[name] = kept
        if dropped[name]:
            log.info(
                "%s: dropped %d of %d classes with fewer than %d (shots + queries) texts",
                name,
                dropped[name],
                len(split[name]),
                need,
            )
    label_names = {lab: names.get(lab) or readable(lab) for s in splits.values() for lab in s}
    name_ids = {}
    if cfg.names_as_examples:  # the names join the text table only when asked
        name_ids = {lab: index.setdefault(name, len(index)) for lab, name in label_names.items()}
    return TaskData(list(index), splits, label_names, dropped, counts, name_ids,
                    content_fingerprint(by_label))  # fmt: skip


def check_feasible(data: TaskData, cfg: TaskConfig, needed: tuple[str, ...]) -> None:
    """Fail before any training if an episode of the requested shape cannot be drawn (the
    ranges of way, shots and queries themselves are checked with the config)."""
    need = cfg.shots + cfg.queries
    for name in needed:
        have = len(data.splits[name])
        if cfg.way <= have:
            continue
        found = f"the {name} split has only {have} classes with at least {need} texts " \
            "(task.shots + task.queries)"  # fmt: skip
        if have == 0 and not data.dropped.get(name) and name != "test":
            raise MetarunError(
                f"the {name} split has no classes (an empty labels.{name}.txt?); "
                "a run that trains needs train and valid classes: evaluate only "
                "(train.steps=0 train.contrastive_steps=0, with init_from=<a "
                "trained run> to test its weights)"
            )
        if have >= 2:
            raise MetarunError(f"task.way={cfg.way} but {found}; lower task.way (<= {have}), "
                               "task.shots or task.queries")  # fmt: skip
        raise MetarunError(f"{found}, and an episode needs at least 2: lower task.shots or "
                           f"task.queries, or give that split more classes or texts")  # fmt: skip
