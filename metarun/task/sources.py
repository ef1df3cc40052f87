"""Read labelled texts from the places a user keeps them, as {label: [texts]}.

Every reader returns plain Python data so the split and episode logic never sees a file format.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from metarun.errors import MetarunError
from metarun.task.rows import Row, RowCounts, group_rows, read_lines, read_rows

SPLIT_NAMES = ("train", "valid", "test")
# The fields of the ProtAugment split format (full.jsonl). A task option written for the hub
# (clinc150 reads "intent" there) falls back to them when its own column is absent.
SPLIT_FORMAT_TEXT, SPLIT_FORMAT_LABEL = "sentence", "label"

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


def read_file(
    path: Path, text_col: str, label_col: str, encoding: str, on_invalid: str
) -> tuple[dict[str, list[str]], RowCounts]:
    rows = read_rows(path, encoding)
    return group_rows(rows, text_col, label_col, f"task.path={path}", on_invalid)


def read_split_dir(
    root: Path, split: str, text_col: str, label_col: str, key: str, encoding: str = "utf-8",
    on_invalid: str = "error",
) -> tuple[dict[str, list[str]], dict[str, list[str]], RowCounts]:  # fmt: skip
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
    rows = read_rows(full, encoding)
    first = rows[0][1] if rows else {}
    if text_col not in first and SPLIT_FORMAT_TEXT in first:
        text_col = SPLIT_FORMAT_TEXT
    if label_col not in first and SPLIT_FORMAT_LABEL in first:
        label_col = SPLIT_FORMAT_LABEL
    by_label, counts = group_rows(rows, text_col, label_col, str(full), on_invalid)
    splits = {name: read_label_file(split_dir, name, by_label, full, encoding)
              for name in SPLIT_NAMES}  # fmt: skip
    check_disjoint(splits, split_dir)
    return by_label, splits, counts


def read_label_file(
    split_dir: Path, name: str, by_label: dict[str, list[str]], full: Path, encoding: str
) -> list[str]:
    f = split_dir / f"labels.{name}.txt"
    if not f.is_file():
        raise MetarunError(f"{f} is missing: a split folder needs labels.{name}.txt")
    labels = list(dict.fromkeys(line.strip() for _, line in read_lines(f, encoding)))
    labels = [lab for lab in labels if lab]
    if not labels and name == "test":  # train / valid may be empty: evaluation-only data
        raise MetarunError(f"{f} is empty: it needs one class name per line")
    unknown = [lab for lab in labels if lab not in by_label]
    if unknown:
        raise MetarunError(f"{f} names classes absent from {full}: {', '.join(unknown[:5])}")
    return labels


def check_disjoint(splits: dict[str, list[str]], where: Path) -> None:
    """Meta-train, validation and test classes must not share a class: a test class seen in
    training makes every test number an overestimate."""
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            shared = sorted(set(splits[a]) & set(splits[b]))
            if shared:
                raise MetarunError(
                    f"{where}: labels.{a}.txt and labels.{b}.txt share {len(shared)} classes "
                    f"({', '.join(shared[:5])}); the splits must be disjoint: remove each "
                    "class from all but one file"
                )


def read_hub(
    dataset_id: str, config: str | None, text_col: str, label_col: str, on_invalid: str
) -> tuple[dict[str, list[str]], RowCounts]:
    """A Hugging Face hub dataset, all of its splits pooled (the meta-splits are by class)."""
    import datasets  # imported here only: most runs read local files and never need it

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        dd = datasets.load_dataset(dataset_id, config)
    except Exception as err:  # the hub raises many types; all mean "could not load"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetarunError(
            f"task.path={dataset_id}: could not load from the Hugging Face hub ({first[:200]}). "
            "Offline, use task.data_dir=<folder in split format> or task.path=<local file>"
        ) from err
    rows: list[Row] = []
    for part in dd.values():
        feature = part.features.get(label_col)
        names = getattr(feature, "names", None)
        for row in part:
            if names is not None and row.get(label_col) is not None:
                row = {**row, label_col: names[row[label_col]]}
            rows.append((len(rows) + 1, row))
    return group_rows(rows, text_col, label_col, f"task.path={dataset_id}", on_invalid)
