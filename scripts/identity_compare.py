"""Compare two folders of identity runs (scripts/identity_runs.sh): per-episode test accuracies,
every metrics.jsonl row and the summaries' status, test, validation and data, timings left out.
Prints one line per run (SAME or what differs) and exits 1 if any run differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TIMINGS = ("time", "seconds", "per_second", "memory", "_mb", "wall")
VOLATILE = {"run_dir", "checkpoint", "git_commit", "versions", "resumed_from_step", "wandb_run_id"}


def clean(value: Any) -> Any:
    """The value without timings and run-specific fields (paths, commit, versions)."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()
                if k not in VOLATILE and not any(t in k for t in TIMINGS)}  # fmt: skip
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def read(path: Path) -> Any:
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def differences(a: Path, b: Path) -> list[str]:
    found = [name for name in ("test_episodes.json", "metrics.jsonl")
             if clean(read(a / name)) != clean(read(b / name))]  # fmt: skip
    left, right = read(a / "summary.json") or {}, read(b / "summary.json") or {}
    found += [f"summary.{key}" for key in ("status", "test", "val", "data")
              if clean(left.get(key)) != clean(right.get(key))]  # fmt: skip
    return found


def main(argv: list[str]) -> int:
    before, after = Path(argv[0]), Path(argv[1])
    runs = sorted(p for p in before.iterdir() if p.is_dir())
    differ = 0
    for run in runs:
        found = differences(run, after / run.name)
        acc = ((read(run / "summary.json") or {}).get("test") or {}).get("acc")
        print(f"{run.name:50s} acc={acc}  {'DIFF ' + ', '.join(found) if found else 'SAME'}")
        differ += bool(found)
    print("identical" if not differ else f"{differ} of {len(runs)} runs differ")
    return 1 if differ or not runs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
