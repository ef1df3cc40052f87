"""Read labelled texts from the places a user keeps them, as {label: [texts]}.

Every reader returns plain Python data so the split and episode logic never sees a file format.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from metarun.errors import MetarunError

SPLIT_NAMES = ("train", "valid", "test")
# The fields of the ProtAugment split format (full.jsonl). A task option written for the hub
# (clinc150 reads "intent" there) falls back to them when its own column is absent.
SPLIT_FORMAT_TEXT, SPLIT_FORMAT_LABEL = "sentence", "label"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# ICD-10-CM repeats one condition as "initial encounter", "subsequent encounter ..." and
# "sequela" variants; they differ only in that suffix, so they are collapsed into one text.
_ENCOUNTER_SUFFIX = re.compile(r",\s*(initial encounter|subsequent encounter|sequela)\b.*$", re.I)


def read_icd10() -> tuple[dict[str, list[str]], dict[str, str]]:
    """ICD-10-CM descriptions grouped by 3-character category; also category -> readable name."""
    import icd10

    by_label: dict[str, set[str]] = defaultdict(set)
    names: dict[str, str] = {}
    for code, (_billable, description) in icd10.codes.items():
        if len(code) == 3:  # the category's own header row is its name, not an example
            names[code] = description
            continue
        by_label[code[:3]].add(_ENCOUNTER_SUFFIX.sub("", description).strip())
    return {label: sorted(texts) for label, texts in by_label.items()}, names


def _group(rows: list[dict], text_col: str, label_col: str, where: str) -> dict[str, list[str]]:
    if not rows:
        raise MetarunError(f"{where} holds no rows")
    columns = sorted(rows[0])
    for key, col in (("task.text_column", text_col), ("task.label_column", label_col)):
        if col not in rows[0]:
            raise MetarunError(
                f"{where} has no column '{col}' (columns: {', '.join(columns)}); "
                f"set {key}=<one of them>"
            )
    by_label: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for row in rows:
        text, label = row[text_col], row[label_col]
        if text is None or label is None or (str(label), str(text)) in seen:
            continue
        seen.add((str(label), str(text)))
        by_label[str(label)].append(str(text))
    return dict(by_label)


def _read_file_rows(path: Path) -> list[dict]:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise MetarunError(
            f"task.path={path}: unsupported file type '{path.suffix}'; "
            f"use one of {', '.join(FILE_BUILDERS)}"
        )
    import datasets

    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    return ds.to_list()


def read_file(path: Path, text_col: str, label_col: str) -> dict[str, list[str]]:
    return _group(_read_file_rows(path), text_col, label_col, f"task.path={path}")


def read_split_dir(
    root: Path, split: str, text_col: str, label_col: str, key: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """A folder in the ProtAugment format: full.jsonl + splits/NN/labels.{train,valid,test}.txt."""
    if not root.is_dir():
        raise MetarunError(f"{key}={root} does not exist; point it at a folder with full.jsonl")
    full = root / "full.jsonl"
    if not full.is_file():
        raise MetarunError(f"{key}={root} has no full.jsonl (one JSON object per line)")
    split_dir = root / "splits" / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in (root / "splits").glob("*") if p.is_dir())
        raise MetarunError(
            f"{split_dir} does not exist; set task.split to one of: {', '.join(found) or 'none'}"
        )
    rows = [json.loads(line) for line in full.read_text().splitlines() if line.strip()]
    if rows and text_col not in rows[0] and SPLIT_FORMAT_TEXT in rows[0]:
        text_col = SPLIT_FORMAT_TEXT
    if rows and label_col not in rows[0] and SPLIT_FORMAT_LABEL in rows[0]:
        label_col = SPLIT_FORMAT_LABEL
    by_label = _group(rows, text_col, label_col, str(full))
    splits = {}
    for name in SPLIT_NAMES:
        f = split_dir / f"labels.{name}.txt"
        if not f.is_file():
            raise MetarunError(f"{f} is missing: a split folder needs labels.{name}.txt")
        labels = [line.strip() for line in f.read_text().splitlines() if line.strip()]
        unknown = [lab for lab in labels if lab not in by_label]
        if unknown:
            raise MetarunError(f"{f} names classes absent from {full}: {', '.join(unknown[:5])}")
        splits[name] = labels
    return by_label, splits


def read_hub(dataset_id: str, config: str | None, text_col: str, label_col: str):
    """A Hugging Face hub dataset, all of its splits pooled (the meta-splits are by class)."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset_id, config)
    except Exception as err:  # the hub raises many types; all mean "could not load"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetarunError(
            f"task.path={dataset_id}: could not load from the Hugging Face hub ({first[:200]}). "
            "Offline, use task.data_dir=<folder in split format> or task.path=<local file>"
        ) from err
    rows: list[dict] = []
    for part in dd.values():
        feature = part.features.get(label_col)
        names = getattr(feature, "names", None)
        for row in part:
            if names is not None and row.get(label_col) is not None:
                row = {**row, label_col: names[row[label_col]]}
            rows.append(row)
    return _group(rows, text_col, label_col, f"task.path={dataset_id}")
