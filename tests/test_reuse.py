"""A trained run reused: evaluated on another task (init_from), labelling new texts
(metarun-predict); and the command line a person expects (--help, --version, folder names)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.errors import MetarunError
from metarun.reuse import load_trained
from tests.cli_helpers import FAST, metarun, run_dirs
from tests.conftest import TOPICS, synthetic_rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ProtoNet meta-trained (4 steps) on the synthetic topics, with checkpoint.pt."""
    root = tmp_path_factory.mktemp("trained")
    rows = synthetic_rows()
    (root / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = metarun(*FAST, f"task.path={root / 'topics.jsonl'}", f"run_dir={root / 'run'}",
                   cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def other_task(root: Path) -> Path:
    """Another dataset: the same topics' words, other sentences and class names."""
    rows = [{"text": r["text"] + " indeed", "label": f"{r['label']}_b"}
            for r in synthetic_rows(seed=7)]  # fmt: skip
    path = root / "other.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_init_from_evaluates_a_trained_run_on_another_task(tmp_path, trained):
    data = other_task(tmp_path)
    proc = metarun(*FAST, f"task.path={data}", f"init_from={trained}", "train.steps=0",
                   "run_dir=eval", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["init_from"]["run"] == str(trained) and summary["status"] == "completed"
    assert summary["train"]["steps_done"] == 0
    refused = metarun(*FAST, f"task.path={data}", f"init_from={trained}", "backbone=tiny-llama",
                      "train.steps=0", cwd=tmp_path)  # fmt: skip
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "another backbone" in lines[0]


def test_load_trained_copies_the_checkpoint_and_refuses_foreign_weights(trained, compose_cfg):
    from metarun.algo import build_algorithm
    from metarun.backbone import load_backbone

    cfg = compose_cfg("backbone=tiny", "algo=protonet")
    algo = build_algorithm(cfg.algo, load_backbone(cfg.backbone), 3)
    state = torch.load(trained / "checkpoint.pt", weights_only=True)["trainable_state"]
    name = next(iter(state))
    assert not torch.equal(dict(algo.named_parameters())[name], state[name])
    record = load_trained(algo, trained)
    assert torch.equal(dict(algo.named_parameters())[name].detach(), state[name])
    assert record["skipped"] == []
    maml = build_algorithm(compose_cfg("backbone=tiny", "algo=maml", "algo.adapt=lora").algo,
                           load_backbone(cfg.backbone), 3)  # fmt: skip
    with pytest.raises(MetarunError, match="do not fit this algorithm"):
        load_trained(maml, trained)


def predict_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("metarun-predict")
    cmd = [exe] if exe else [sys.executable, "-m", "metarun.predict"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_predict_labels_a_file_of_new_texts(tmp_path, trained):
    classes = ["weather", "music", "food"]
    with (tmp_path / "support.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label in classes:
            words = TOPICS[label].split()
            writer.writerows([[" ".join(words[:3]), label], [" ".join(words[3:6]), label]])
    queries = [{"text": " ".join(TOPICS[c].split()[i : i + 3])} for c in classes for i in (1, 2)]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    proc = predict_cli(str(trained), "--support", "support.csv", "--queries", "new.jsonl",
                       "--out", "pred.csv", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "pred.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [q["text"] for q in queries]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in sorted(classes)]
        assert abs(sum(probs) - 1) < 1e-4 and row["predicted"] in classes
    correct = sum(r["predicted"] == c for r, c in zip(rows, [c for c in classes for _ in "ab"],
                                                          strict=True))  # fmt: skip
    assert correct >= 4  # the topics' own words: a trained ProtoNet labels most of them

    labels = ["--labels", "weather", "music", "food", "sport"]
    missing = predict_cli(str(trained), "--support", "support.csv", "--queries", "new.jsonl",
                          *labels, cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2 and "no example of class sport" in missing.stderr
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    bad = predict_cli(str(trained), "--support", "support.csv", "--queries", "bad.jsonl",
                      cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "bad.jsonl, line 1: not valid JSON" in bad.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


def test_help_version_and_run_folder_names(tmp_path, synthetic_jsonl):
    help_ = metarun("--help", cwd=tmp_path)
    assert help_.returncode == 0 and "meta-learning experiments" in help_.stdout
    assert "protonet*" in help_.stdout and "schema" not in help_.stdout
    assert "Examples:" in help_.stdout
    version = metarun("--version", cwd=tmp_path)
    from importlib import metadata

    assert version.stdout.strip() == f"metarun {metadata.version('metarun')}"
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", "train.steps=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    assert run.name.endswith("_protonet_tiny_local_3w2s")
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "metarun.log").is_file()
