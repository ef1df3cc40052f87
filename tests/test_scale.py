"""Scaling out: exact resume after SIGKILL and Ctrl-C, 2 gloo processes equal 1 process,
Hydra's joblib launcher and Optuna sweeper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metarun.rundir.files import load_checkpoint
from tests.cli_helpers import FAST, metarun, read_jsonl, run_dirs

pytestmark = pytest.mark.slow
LONG = [*FAST, "train.steps=30", "train.val_interval=10", "train.checkpoint_interval=5"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "metarun", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int) -> None:
    """Block until the run has logged training step `step` (it must still be running)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.is_file() and any(
            r.get("step", 0) >= step and "train/loss" in r for r in read_jsonl(metrics)
        ):
            assert proc.poll() is None, "the run finished before it could be stopped"
            return
        time.sleep(0.005)
    raise AssertionError(f"step {step} never came: {proc.stderr and proc.stderr.read()}")


def final(run: Path) -> tuple[dict, dict, list]:
    state = load_checkpoint(run / "last.pt")
    summary = json.loads((run / "summary.json").read_text())
    losses = [(r["step"], r["train/loss"]) for r in read_jsonl(run / "metrics.jsonl")
              if "train/loss" in r]  # fmt: skip
    return state["trainable_state"], summary, losses


def test_killed_and_interrupted_runs_resume_exactly(tmp_path, synthetic_jsonl):
    args = [*LONG, f"task.path={synthetic_jsonl}"]  # the tiny BERT keeps its dropout: RNG matters
    ref = tmp_path / "ref"
    assert metarun(*args, f"run_dir={ref}", cwd=tmp_path).returncode == 0
    weights, summary, losses = final(ref)
    assert [s for s, _ in losses] == list(range(1, 31))

    killed = tmp_path / "killed"  # SIGKILL after step 13: resumes from the step-10 state
    proc = start([*args, f"run_dir={killed}"], tmp_path)
    wait_for_step(proc, killed / "metrics.jsonl", 13)
    proc.kill()
    proc.wait()
    assert load_checkpoint(killed / "last.pt")["step"] in (10, 15)
    resumed = metarun(*args, f"train.resume={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    stopped = tmp_path / "stopped"  # Ctrl-C: saves after the current step and exits cleanly
    proc = start([*args, f"run_dir={stopped}"], tmp_path)
    wait_for_step(proc, stopped / "metrics.jsonl", 13)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("metarun: error: interrupted by Ctrl-C after step")
    assert f"train.resume={stopped}" in err and "Traceback" not in err
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    again = metarun(*args, f"run_dir={stopped}", cwd=tmp_path)  # same folder: resumes by itself
    assert again.returncode == 0, again.stderr

    for run in (killed, stopped):
        w, s, log = final(run)
        assert w.keys() == weights.keys()
        assert all(torch.equal(w[k], weights[k]) for k in weights), run.name
        assert log == losses  # metrics.jsonl reads like one uninterrupted run
        assert s["test"] == summary["test"] and s["val"] == summary["val"]
        assert s["resumed_from_step"] > 0


def test_rerun_in_a_finished_folder_continues_it_and_a_changed_config_is_refused(
    tmp_path, synthetic_jsonl
):
    run = tmp_path / "run"
    args = [*FAST, f"task.path={synthetic_jsonl}", f"run_dir={run}", "logger=wandb"]
    assert metarun(*args, cwd=tmp_path).returncode == 0
    first = json.loads((run / "summary.json").read_text())
    again = metarun(*args, cwd=tmp_path)  # finished: nothing to train, same W&B run, same test
    assert again.returncode == 0, again.stderr
    second = json.loads((run / "summary.json").read_text())
    assert second["resumed_from_step"] == 4 and second["wandb_run_id"] == first["wandb_run_id"]
    assert second["test"] == first["test"]
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]  # nothing repeated
    assert sum("test/acc" in r for r in lines) == 1
    proc = metarun(*args, "train.lr=0.5", cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "train.lr" in proc.stderr
    missing = metarun(*FAST, f"task.path={synthetic_jsonl}", f"train.resume={tmp_path / 'nope'}",
                      cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2 and "no last.pt" in missing.stderr


def test_two_gloo_processes_take_the_same_steps_as_one(tmp_path, synthetic_jsonl):
    # SGD: Adam divides by the gradient's running scale, which turns float rounding on
    # near-zero gradients into whole steps; the sum of shards is otherwise the same gradient.
    args = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=3", "train.meta_batch_size=4",
            "train.val_interval=3", "train.optimizer=sgd", "train.lr=0.05",
            "+backbone.arch.hidden_dropout_prob=0.0",
            "+backbone.arch.attention_probs_dropout_prob=0.0"]  # fmt: skip
    one = tmp_path / "one"
    assert metarun(*args, f"run_dir={one}", cwd=tmp_path).returncode == 0
    two = tmp_path / "two"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "metarun", "hardware=ddp", "hardware.device=cpu", "hardware.precision=fp32",
         "hardware.tf32=false", *args, f"run_dir={two}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (w1, s1, l1), (w2, s2, l2) = final(one), final(two)
    assert s2["processes"] == 2 and s1["processes"] == 1
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-6, rtol=1e-4), name
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(l1, l2, strict=True))
    assert s1["test"]["episodes"] == s2["test"]["episodes"] == 10  # sharded, then gathered
    assert abs(s1["test"]["acc"] - s2["test"]["acc"]) < 1e-6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("metarun_rank")] == []


def test_joblib_launcher_and_optuna_sweeper(tmp_path, synthetic_jsonl):
    base = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=2", "train.val_interval=1"]
    for name in ("joblib", "optuna"):
        (tmp_path / name).mkdir()
    proc = metarun("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *base, "seed=0,1",
                   cwd=tmp_path / "joblib")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((r / "summary.json").read_text())
                 for r in run_dirs(tmp_path / "joblib")]  # fmt: skip
    assert sorted(s["seeds"]["seed"] for s in summaries) == [0, 1]
    proc = metarun("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                   "hydra.sweeper.direction=maximize", *base,
                   "train.lr=tag(log,interval(1e-4,1e-2))", cwd=tmp_path / "optuna")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = run_dirs(tmp_path / "optuna")
    assert len(runs) == 4
    (results,) = (tmp_path / "optuna" / "outputs").rglob("optimization_results.yaml")
    best = max(json.loads((r / "summary.json").read_text())["val"]["best_acc"] for r in runs)
    assert OmegaConf.load(results).best_value == best  # Optuna maximised what the runs returned
