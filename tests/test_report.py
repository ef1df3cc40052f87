"""scripts/report.py: run folders -> mean over class splits beside the published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scripts import report
from scripts.report import collect, main


def fake_run(root: Path, name: str, split: str, acc: float, steps: int, shots: int = 1,
             status: str = "completed") -> None:  # fmt: skip
    run = root / name
    run.mkdir(parents=True)
    summary = {"status": status, "algo": "protonet", "task": "banking77", "backbone": "minilm",
               "shots": shots, "seeds": {"split": split}, "wall_seconds": 60.0,
               "test": {"acc": acc, "acc_ci95": 0.01, "episodes": 600}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"train": {"steps": steps}, "algo": {"_target_": "metarun.algo.protonet.ProtoNet"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def test_report_averages_over_splits_and_sets_published_numbers_beside(tmp_path):
    sweep = tmp_path / "multirun"
    for i, (split, acc) in enumerate([("01", 0.80), ("02", 0.84), ("03", 0.86)]):
        fake_run(sweep, f"{i}_trained", split, acc, steps=60)
    fake_run(sweep, "9_frozen", "01", 0.70, steps=0)
    fake_run(sweep, "10_failed", "02", 0.10, steps=0, status="failed")  # not counted
    groups = collect([sweep])
    trained = groups[("banking77", 1, "minilm", "protonet, 60 steps")]
    assert trained.accs == pytest.approx({"01": 80.0, "02": 84.0, "03": 86.0})
    frozen = groups[("banking77", 1, "minilm", "protonet, no meta-training")]
    assert list(frozen.accs) == ["01"]

    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\nKept prose.\n")
    main([str(sweep), "--out", str(out)])
    text = out.read_text()
    assert "Kept prose." in text
    row = next(line for line in text.splitlines() if "protonet, 60 steps" in line)
    assert "**83.33** ± 1.00" in row and "| 3 |" in row and "01: 80.00" in row
    assert "ProtAugment (published) | | 89.6" in text and "| 5 | ProtoNet, BERT-base" in text


def test_report_refuses_two_runs_of_one_split(tmp_path):
    fake_run(tmp_path / "a", "0", "01", 0.8, steps=60)
    fake_run(tmp_path / "b", "0", "01", 0.9, steps=60)
    with pytest.raises(SystemExit, match="split 01"):
        collect([tmp_path / "a", tmp_path / "b"])


def test_report_without_out_only_prints(tmp_path, capsys):
    """Aggregating one's own runs must not overwrite the repository's docs/RESULTS.md."""
    fake_run(tmp_path, "0", "01", 0.8, steps=60)
    results = Path(report.__file__).resolve().parents[1] / "docs" / "RESULTS.md"
    before = results.read_text()
    main([str(tmp_path)])
    assert "protonet, 60 steps" in capsys.readouterr().out
    assert results.read_text() == before
