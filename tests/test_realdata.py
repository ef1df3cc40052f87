"""Real data (../shared/data): pretrained MiniLM on BANKING77's published split 01."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import metarun, read_jsonl, run_dirs
from tests.conftest import SHARED_DATA

BANKING = SHARED_DATA / "banking77"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not (BANKING / "full.jsonl").is_file(), reason=f"{BANKING} is absent"),
]
BASE = ["task=banking77", f"task.data_dir={BANKING}", "task.split=01", "task.shots=1",
        "logger.progress=false"]  # fmt: skip


def test_frozen_minilm_baseline_on_banking77(tmp_path):
    proc = metarun(*BASE, "train.steps=0", "task.test_episodes=200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["test"] == {"classes": 27, "texts": 4661}  # the published test classes
    # Chance is 20%; a pretrained sentence encoder separates banking intents far better.
    assert 0.6 < summary["test"]["acc"] < 1.0
    assert summary["test"]["acc_ci95"] < 0.05


def test_protonet_training_logs_validation_by_step(tmp_path):
    proc = metarun(*BASE, "train.steps=6", "train.val_interval=3", "task.val_episodes=20",
                   "task.test_episodes=40", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    val = [(m["step"], m["val/acc"]) for m in read_jsonl(run / "metrics.jsonl") if "val/acc" in m]
    assert [s for s, _ in val] == [3, 6] and all(0.4 < a <= 1 for _, a in val)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["best_step"] in (3, 6) and summary["test"]["acc"] > 0.5


def test_second_order_maml_trains_on_banking77_and_logs_validation(tmp_path):
    proc = metarun(*BASE, "algo=maml", "algo.inner_steps=2", "algo.eval_inner_steps=2",
                   "train.meta_batch_size=1", "train.steps=2", "train.val_interval=1",
                   "task.val_episodes=4", "task.test_episodes=8", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    val = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "val/acc" in m]
    assert val == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == "maml" and summary["test"]["acc"] > 0.4  # chance is 0.2
    assert summary["train"]["episodes_per_second"] > 0


def test_baselines_without_meta_training_beat_chance_on_banking77(tmp_path):
    """Logistic regression per episode and label-name similarity, on the same test episodes."""
    proc = metarun("-m", *BASE, "algo=frozen,zeroshot", "train.steps=0", "task.test_episodes=40",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path)]
    summaries = {s["algo"]: s for s in records}
    assert sorted(summaries) == ["frozen", "zeroshot"]
    # Chance is 20%. Label names such as "card payment fee charged" carry the intent, so even
    # without a single support example MiniLM does well above it.
    assert summaries["frozen"]["test"]["acc"] > 0.6
    assert summaries["zeroshot"]["test"]["acc"] > 0.4
