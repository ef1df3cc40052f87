"""Labelled rows from a user's file, checked: every problem is an error with its line numbers
or, when asked, a counted drop; never a silent one.

Files are read with the standard library (pyarrow for parquet) rather than `datasets`, so that
labels stay strings ("03" stays "03", 3 and "3" are one class), a malformed line is reported by
its number, and an undecodable byte names the encoding to set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metarun.errors import MetarunError

log = logging.getLogger(__name__)
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
INVALID_ROWS = ("error", "drop")
Row = tuple[int, dict]  # (line number, or row number for parquet and hub data; the row)


@dataclass
class RowCounts:
    """What loading found, recorded in summary.json under data.rows."""

    rows: int = 0  # rows read
    invalid_dropped: int = 0  # missing or empty text or label, dropped (task.on_invalid_rows)
    duplicates: int = 0  # the same text under the same label again: kept once
    multi_label_texts: int = 0  # texts found under more than one label: kept under each

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        with path.open(encoding=codec, newline="") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as err:
        raise MetarunError(
            f"{path} is not valid {encoding} text (byte {err.start} of a line cannot be "
            "decoded); set task.encoding=<the file's encoding, e.g. latin-1 or cp1252>"
        ) from None
    except LookupError:
        raise MetarunError(f"task.encoding={encoding} is not an encoding Python knows") from None


def _json_lines(path: Path, encoding: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in read_lines(path, encoding):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MetarunError(
                f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise MetarunError(
                f"{path}, line {number}: a JSON {type(row).__name__}, not an object; "
                'each line must be one JSON object such as {"text": ..., "label": ...}'
            )
        rows.append((number, row))
    return rows


def _json_array(path: Path, encoding: str) -> list[Row]:
    text = "".join(line for _, line in read_lines(path, encoding))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetarunError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MetarunError(f"{path}: a .json file must hold a list of objects (or use .jsonl)")
    return [(i, row) for i, row in enumerate(data, start=1)]


def _csv(path: Path, encoding: str) -> list[Row]:
    lines = read_lines(path, encoding)
    reader = csv.DictReader(line for _, line in lines)
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise MetarunError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise MetarunError(f"{path} is not a readable parquet file ({err})") from None
    return [(i, row) for i, row in enumerate(table.to_pylist(), start=1)]


def read_rows(path: Path, encoding: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise MetarunError(
            f"task.path={path}: unsupported file type '{path.suffix}'; use one of "
            f"{', '.join(FILE_TYPES)}"
        )
    if suffix == ".parquet":
        return _parquet(path)
    if suffix == ".csv":
        return _csv(path, encoding)
    with path.open("rb") as f:
        starts_as_array = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    return _json_array(path, encoding) if starts_as_array else _json_lines(path, encoding)


def as_label(value: Any) -> str | None:
    """A label as a string, or None when missing: 3, 3.0 and "3" are one class."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    label = str(value).strip()
    return label or None


def as_text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list | bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class ColumnKeys:
    """How the user names the columns and the drop option in a message: a run's config keys,
    or a command's flags (metarun-predict)."""

    text: str = "task.text_column=<one of them>"
    label: str = "task.label_column=<one of them>"
    drop: str | None = "task.on_invalid_rows=drop"


TASK_KEYS = ColumnKeys()


def _check_columns(
    rows: list[Row], text_col: str, label_col: str, where: str, keys: ColumnKeys
) -> None:
    if not rows:
        raise MetarunError(f"{where} holds no rows; it needs a '{text_col}' and a '{label_col}' "
                           "field in every row")  # fmt: skip
    columns = sorted({key for _, row in rows for key in row if isinstance(key, str)})
    for key, col in ((keys.text, text_col), (keys.label, label_col)):
        if col not in columns:
            raise MetarunError(
                f"{where} has no column '{col}' (columns: {', '.join(columns)}); set {key}"
            )


def group_rows(
    rows: list[Row], text_col: str, label_col: str, where: str, on_invalid: str = "error",
    keys: ColumnKeys = TASK_KEYS,
) -> tuple[dict[str, list[str]], RowCounts]:  # fmt: skip
    """{label: [texts]} and the counts of what was dropped, merged or found twice."""
    if on_invalid not in INVALID_ROWS:
        raise MetarunError(f"task.on_invalid_rows={on_invalid}; use error or drop")
    _check_columns(rows, text_col, label_col, where, keys)
    counts = RowCounts(rows=len(rows))
    by_label: dict[str, list[str]] = defaultdict(list)
    labels_of: dict[str, set[str]] = defaultdict(set)
    invalid: list[int] = []
    for number, row in rows:
        text, label = as_text(row.get(text_col)), as_label(row.get(label_col))
        if text is None or label is None:
            invalid.append(number)
        elif label in labels_of[text]:
            counts.duplicates += 1
        else:
            labels_of[text].add(label)
            by_label[label].append(text)
    if invalid:
        shown = ", ".join(map(str, invalid[:5])) + (", ..." if len(invalid) > 5 else "")
        what = f"{len(invalid)} of {len(rows)} rows of {where} lack a text or a label"
        lines = f"line{'s' if len(invalid) > 1 else ''} {shown}"
        if on_invalid == "error":
            drop = f", or drop them with {keys.drop}" if keys.drop else ""
            raise MetarunError(f"{what} ({lines}); fix them{drop}")
        log.warning("%s: dropped (task.on_invalid_rows=drop; %s)", what, lines)
        counts.invalid_dropped = len(invalid)
    counts.multi_label_texts = sum(len(labels) > 1 for labels in labels_of.values())
    if counts.multi_label_texts:
        log.warning("%s: %d texts appear under more than one label (kept under each)",
                    where, counts.multi_label_texts)  # fmt: skip
    if not by_label:
        raise MetarunError(f"{where} has no row with both a text and a label")
    return dict(by_label), counts
