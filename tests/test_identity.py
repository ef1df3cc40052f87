"""scripts/identity_compare.py: the refactor check tells a changed number from a changed time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_folder(path: Path, accuracies: list[float], seconds: float) -> None:
    path.mkdir(parents=True)
    (path / "test_episodes.json").write_text(json.dumps({"accuracy": accuracies}))
    rows = [{"step": 1, "train/loss": 0.5, "train/seconds": seconds}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "completed", "test": {"acc": sum(accuracies) / len(accuracies)},
               "wall_seconds": seconds, "run_dir": str(path)}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/identity_compare.py", str(a), str(b)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip


def test_timings_and_paths_may_change_numbers_may_not(tmp_path):
    _run_folder(tmp_path / "before" / "run", [0.8, 0.6], seconds=3.0)
    _run_folder(tmp_path / "after" / "run", [0.8, 0.6], seconds=5.0)  # slower, elsewhere
    same = _compare(tmp_path / "before", tmp_path / "after")
    assert same.returncode == 0 and "SAME" in same.stdout and "identical" in same.stdout
    shutil.rmtree(tmp_path / "after")
    _run_folder(tmp_path / "after" / "run", [0.8, 0.4], seconds=3.0)  # one episode changed
    changed = _compare(tmp_path / "before", tmp_path / "after")
    assert changed.returncode == 1
    assert "DIFF test_episodes.json, summary.test" in changed.stdout
