"""Failures of the machine, not of the command: a full disk, a read-only folder. Injected into
a real `metarun` process (tests/faults/sitecustomize.py); each ends in one line, a folder whose
summary.json and metarun.log say what happened, and no temporary file left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli_helpers import FAST, metarun, wandb_records

FAULTS = str(Path(__file__).parent / "faults")


def faulty(fault: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (FAULTS, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "METARUN_TEST_FAULT": fault}


def test_disk_full_is_one_line_and_the_record_says_failed(tmp_path, synthetic_jsonl):
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", "run_dir=run", "logger=wandb",
                   cwd=tmp_path, **faulty("enospc"))  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("metarun: error: cannot write ") and "disk is full" in lines[0]
    assert "checkpoint.pt" in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    run = tmp_path / "run"
    assert not list(run.glob("*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk is full" in summary["error"]
    assert "failed: cannot write" in (run / "metarun.log").read_text()
    assert (run / "metrics.jsonl").read_text()  # what was logged before is kept
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    exits = [r.exit for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1].exit_code == 1  # the dashboard shows the run as failed


def test_disk_full_inside_torch_save_is_one_line(tmp_path, synthetic_jsonl):
    """torch.save reports a full disk as a RuntimeError caused by the OSError: found through
    the cause, it is the same one line as any full disk, naming the checkpoint."""
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", "run_dir=run", cwd=tmp_path,
                   **faulty("enospc-torch"))  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "disk is full" in lines[0] and ".pt" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk is full" in summary["error"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_read_only_output_folder_is_one_line(tmp_path, synthetic_jsonl):
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", "run_dir=readonly/run", cwd=tmp_path,
                   **faulty("erofs"))  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "readonly/run" in lines[0] and "read-only" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
