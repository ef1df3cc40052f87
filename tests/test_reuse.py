"""A trained run reused: evaluated on another task (init_from), labelling new texts
(metarun-predict); and the command line a person expects (--help, --version, folder names)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.errors import MetarunError
from metarun.predict import predict
from metarun.rundir.init_from import load_trained
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
    queries = [{"id": f"q{c}{i}", "text": " ".join(TOPICS[c].split()[i : i + 3])}
               for c in classes for i in (1, 2)]  # fmt: skip
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    proc = predict_cli(str(trained), "--support", "support.csv", "--queries", "new.jsonl",
                       "--out", "pred.csv", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "pred.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [q["text"] for q in queries]
    assert [r["id"] for r in rows] == [q["id"] for q in queries]  # joins back to the input
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
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    assert re.fullmatch(rf"{stamp}_protonet_tiny_local_3w2s_seed0_[0-9a-f]{{6}}", run.name)
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "metarun.log").is_file()


def test_predict_refuses_a_failed_run_and_an_output_over_its_input(tmp_path, trained):
    support = tmp_path / "support.jsonl"
    support.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(per_class=2)))
    (tmp_path / "new.jsonl").write_text(json.dumps({"text": "rain and snow"}) + "\n")
    failed = tmp_path / "failed"
    shutil.copytree(trained, failed)
    summary = json.loads((failed / "summary.json").read_text())
    summary |= {"status": "failed", "error": "train/loss is NaN at step 3"}
    (failed / "summary.json").write_text(json.dumps(summary))
    args = ["--support", "support.jsonl", "--queries", "new.jsonl"]
    refused = predict_cli(str(failed), *args, "--out", "pred.jsonl", cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "did not complete (status failed: train/loss is NaN at step 3)" in lines[0]
    assert "--allow-failed" in lines[0] and not (tmp_path / "pred.jsonl").exists()
    allowed = predict_cli(str(failed), *args, "--out", "pred.jsonl", "--allow-failed",
                          cwd=tmp_path)  # fmt: skip
    assert allowed.returncode == 0 and (tmp_path / "pred.jsonl").is_file(), allowed.stderr
    before = (tmp_path / "new.jsonl").read_bytes()
    over = predict_cli(str(trained), *args, "--out", "./new.jsonl", cwd=tmp_path)
    assert over.returncode == 2 and "--out new.jsonl is an input file" in over.stderr
    assert (tmp_path / "new.jsonl").read_bytes() == before
    nowhere = predict_cli(str(trained), *args, "--out", "no/such/pred.csv", cwd=tmp_path)
    assert nowhere.returncode == 2 and "the folder no/such does not exist" in nowhere.stderr
    column = predict_cli(str(trained), *args, "--label-column", "intent", cwd=tmp_path)
    assert column.returncode == 2 and "set --label-column <one of them>" in column.stderr
    assert "task." not in column.stderr
    (trained.parent / "broken").mkdir(exist_ok=True)
    for name in ("summary.json", "config.yaml"):
        shutil.copy(trained / name, trained.parent / "broken" / name)
    (trained.parent / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    corrupt = predict_cli(str(trained.parent / "broken"), *args, cwd=tmp_path)
    assert corrupt.returncode == 2 and "not a readable metarun checkpoint" in corrupt.stderr
    assert "resume" not in corrupt.stderr and "Traceback" not in corrupt.stderr


def test_predict_is_inductive_unless_asked(tmp_path, trained):
    """A transductive run (prototypes refined by the queries) labels each text as if alone by
    default: the same probabilities in a batch and on its own; --transductive makes the whole
    file one query set, and a text's probabilities then depend on the others."""
    run = tmp_path / "transductive"
    shutil.copytree(trained, run)
    config = (run / "config.yaml").read_text()
    assert "transductive_steps: 0" in config
    (run / "config.yaml").write_text(config.replace("transductive_steps: 0",
                                                    "transductive_steps: 3"))  # fmt: skip
    support = tmp_path / "support.jsonl"
    support.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(per_class=2)))
    texts = [r["text"] for r in synthetic_rows(per_class=3, seed=5)][::4]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")

    def probs(queries: str, transductive: bool = False) -> dict:
        (first, *_) = predict(run, support, tmp_path / queries, transductive=transductive)
        return {k: v for k, v in first.items() if k.startswith("prob_")}

    alone, batched = probs("one.jsonl"), probs("all.jsonl")
    assert all(abs(alone[k] - batched[k]) < 1e-4 for k in alone)
    moved = probs("all.jsonl", transductive=True)
    assert any(abs(moved[k] - alone[k]) > 1e-3 for k in alone)
