"""The `metarun` command end to end, as a subprocess, offline."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from metarun.rundir.files import load_checkpoint
from tests.cli_helpers import FAST, item_key, metarun, read_jsonl, run_dirs, wandb_records

pytestmark = pytest.mark.slow


def test_smoke_run_leaves_a_complete_record(tmp_path, synthetic_jsonl):
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["algo"] == "protonet" and summary["backbone"] == "tiny"
    assert summary["test"]["episodes"] == 10 and 0 <= summary["test"]["acc"] <= 1
    assert summary["test"]["acc_ci95"] > 0 and 0 <= summary["test"]["f1"] <= 1
    assert summary["seeds"] == {"seed": 0, "eval_seed": 1234, "split_seed": 0, "split": "01"}
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0] or summary["versions"]
    assert summary["train"]["steps_done"] == 4 and summary["train"]["episodes_per_second"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["wall_seconds"] > 0

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "val/acc" in m] == [2, 4]
    assert [m["step"] for m in metrics if "test/acc" in m] == [4]

    resolved = OmegaConf.load(run / "config.yaml")
    assert "${" not in OmegaConf.to_yaml(resolved)  # interpolations resolved, e.g. the model path
    assert resolved.task.path == str(synthetic_jsonl)
    episodes = json.loads((run / "test_episodes.json").read_text())
    assert len(episodes["accuracy"]) == 10 and episodes["eval_seed"] == 1234

    ckpt = load_checkpoint(run / "checkpoint.pt")  # weights_only=True
    assert ckpt["step"] in (2, 4) and ckpt["choices"]["backbone"] == "tiny"
    assert ckpt["config"]["task"]["way"] == 3 and "torch" in ckpt["versions"]
    assert any(k.startswith("encoder.model.") for k in ckpt["trainable_state"])
    assert "Traceback" not in proc.stderr


def test_steps_zero_evaluates_the_untrained_backbone_on_icd10(tmp_path):
    proc = metarun(
        "backbone=tiny", "train.steps=0", "task.test_episodes=20", "logger.progress=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "icd10" and summary["shots"] == 1
    assert summary["train"]["steps_done"] == 0 and summary["val"]["best_acc"] is None
    assert summary["checkpoint"] is None and not (run / "checkpoint.pt").exists()
    assert summary["test"]["acc"] > 0.2  # chance for 5-way


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["algo=nope"],
            "Could not find 'algo/nope'. Available options in 'algo': anil, finetune, fomaml",
        ),
        (["backbone=tiny", "task.way=500"], "task.way=500 but the test split has only"),
        (["task=banking77", "task.data_dir=/no/such/dir"], "task.data_dir=/no/such/dir does not"),
        (["task=local", "task.label_column=intent"], "no column 'intent'"),
        (["task.wya=3"], "task.wya is not a key of task; did you mean task.way?"),
        (["algo=maml", "backbone=bert-base"], "offline use backbone=minilm or backbone=smollm2"),
    ],
    ids=[
        "unknown-algo",
        "way-too-large",
        "missing-data-dir",
        "missing-column",
        "misspelt-key",
        "hub-backbone-offline",
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, synthetic_jsonl, args, expected):
    if "task=local" in args:
        args = [*args, f"task.path={synthetic_jsonl}", "backbone=tiny"]
    proc = metarun(*args, "train.steps=0", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("metarun: error: ") and expected in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_multirun_leaves_one_folder_per_job_and_groups_wandb_runs(tmp_path, synthetic_jsonl):
    proc = metarun(
        "-m", *FAST, f"task.path={synthetic_jsonl}", "task.shots=1,2", "logger=wandb",
        cwd=tmp_path, WANDB_MODE="offline",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = run_dirs(tmp_path)
    assert len(runs) == 2 and runs[0].parent == runs[1].parent
    sweep = runs[0].parent.name
    shots = set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed"
        shots.add(summary["shots"])
        (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        records = list(wandb_records(wandb_file))
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert info.run_group == sweep and info.job_type == "metric"  # ProtoNet's family
        assert info.display_name == f"protonet-tiny-local-3w{summary['shots']}s-seed0"
        config = {u.key: json.loads(u.value_json) for u in info.config.update}
        assert config["algo"] == "protonet" and config["backbone"] == "tiny"
        assert config["shots"] == summary["shots"] == config["cfg"]["task"]["shots"]
        history = {item_key(i) for r in records if r.HasField("history") for i in r.history.item}
        assert {"train/loss", "val/acc", "test/acc"} <= history
        assert summary["wandb_run_id"] == info.run_id
        summaries = [r.summary for r in records if r.WhichOneof("record_type") == "summary"]
        finals = {item_key(i): i.value_json for s in summaries for i in s.update}
        assert json.loads(finals["status"]) == "completed" and "acc" in json.loads(finals["test"])
    assert shots == {1, 2}


def test_configs_found_from_any_directory_and_user_groups_added(tmp_path, synthetic_jsonl):
    proc = metarun("--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "_target_: metarun.algo.protonet.ProtoNet" in proc.stdout

    user = tmp_path / "myconf" / "task"
    user.mkdir(parents=True)
    (user / "topics.yaml").write_text(f"path: {synthetic_jsonl}\nway: 3\n")
    proc = metarun(
        "--config-dir", str(tmp_path / "myconf"), "task=topics", "--cfg", "job", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    task = OmegaConf.create(proc.stdout).task
    assert task.path == str(synthetic_jsonl) and task.way == 3 and task.queries == 5

    (user / "typo.yaml").write_text("wya: 3\n")
    proc = metarun(
        "--config-dir", str(tmp_path / "myconf"), "task=typo", "--cfg", "job", cwd=tmp_path
    )
    assert proc.returncode == 2 and "wya" in proc.stderr and "Traceback" not in proc.stderr


def test_gradient_family_end_to_end(tmp_path, synthetic_jsonl):
    proc = metarun(
        "-m", *FAST, f"task.path={synthetic_jsonl}", "algo=maml,fomaml,anil,reptile",
        "++algo.inner_steps=2", "++algo.eval_inner_steps=2", "train.steps=2", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path)]
    assert sorted(s["algo"] for s in summaries) == ["anil", "fomaml", "maml", "reptile"]
    for summary in summaries:
        assert summary["status"] == "completed" and summary["test"]["episodes"] == 10
        assert summary["train"]["episodes_per_second"] > 0 and summary["peak_memory_mb"] > 0


def test_every_other_algorithm_end_to_end(tmp_path, synthetic_jsonl):
    algos = "relationnet,matchingnet,ridge,hypernet,finetune,frozen,zeroshot"
    proc = metarun("-m", *FAST, f"task.path={synthetic_jsonl}", f"algo={algos}",
                   "train.steps=2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    decoder = metarun(*FAST, f"task.path={synthetic_jsonl}", "backbone=tiny-gpt2",
                      "algo=metaicl", "train.steps=2", cwd=tmp_path)  # fmt: skip
    assert decoder.returncode == 0, decoder.stderr
    records = [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path)]
    summaries = {s["algo"]: s for s in records}
    assert sorted(summaries) == sorted([*algos.split(","), "metaicl"])
    for name, summary in summaries.items():
        assert summary["status"] == "completed" and summary["test"]["episodes"] == 10, name
        assert 0 <= summary["test"]["acc"] <= 1
    assert summaries["frozen"]["train"]["steps_done"] == 0  # nothing to meta-train
    assert summaries["metaicl"]["train"]["steps_done"] == 2


def test_prompt_algorithm_on_an_encoder_is_one_clear_line(tmp_path, synthetic_jsonl):
    proc = metarun(*FAST, f"task.path={synthetic_jsonl}", "algo=icl", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("metarun: error:") and "a decoder backbone" in lines[-1]
    assert "Traceback" not in proc.stderr
