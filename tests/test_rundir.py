"""Run folders that never mix: one live process per folder (a lock), unique default names for
runs started together, folders Hydra made passed back as they are, evaluation-only data, and
commands refused before they write anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarun.errors import MetarunError, RunInterrupted
from metarun.interrupts import StopSignals
from metarun.rundir.folder import LOCK_FILE, FolderLock
from tests.cli_helpers import FAST, metarun, read_jsonl, run_dirs
from tests.conftest import synthetic_rows

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_a_folder_lock_refuses_a_second_holder_and_leaves_nothing_behind(tmp_path):
    run = tmp_path / "run"
    first = FolderLock(run).acquire()
    assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    held = rf"in use by another metarun process \(pid {os.getpid()}\)"
    with pytest.raises(MetarunError, match=held):
        FolderLock(run).acquire()
    first.release()
    assert not (run / LOCK_FILE).exists()  # a refused command leaves the folder as it was
    FolderLock(run).acquire().release()


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from metarun.rundir.folder import FolderLock; "
        "FolderLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(MetarunError, match=f"pid {holder.pid}"):
        FolderLock(run).acquire()
    holder.kill()
    holder.wait()
    assert (run / LOCK_FILE).exists()  # the file stays, the lock does not
    FolderLock(run).acquire().release()


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metarun", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_a_second_process_on_a_live_folder_is_refused(tmp_path, synthetic_jsonl):
    # long enough to be alive when the second command starts; stopped by SIGTERM afterwards
    args = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=100000", "train.val_interval=500",
            "run_dir=run"]  # fmt: skip
    first = start(args, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and any("train/loss" in r for r in read_jsonl(metrics))):
        assert time.time() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.01)
    second = metarun(*args, cwd=tmp_path)
    assert first.poll() is None  # still training: the second met a live run
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"run_dir=run is in use by another metarun process (pid {first.pid})" in lines[0]
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err  # stopped by us, not disturbed by the second
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "resumed_from_step" not in summary
    steps = [r["step"] for r in read_jsonl(metrics) if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, none twice
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(tmp_path, synthetic_jsonl):
    args = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=2"]
    procs = [start([*args, f"seed={seed}"], tmp_path) for seed in (0, 0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = run_dirs(tmp_path)
    assert len(runs) == 3
    for run in runs:  # every file of a folder is one run's
        summary = json.loads((run / "summary.json").read_text())
        config = (run / "config.yaml").read_text()
        assert f"seed: {summary['seeds']['seed']}\n" in config
        assert f"_seed{summary['seeds']['seed']}_" in run.name


@pytest.mark.slow
def test_folders_a_multirun_made_can_be_passed_back(tmp_path, synthetic_jsonl):
    base = [*FAST, f"task.path={synthetic_jsonl}"]
    sweep = metarun("-m", *base, "seed=0,1", "train.steps=2", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    job = next(r for r in run_dirs(tmp_path) if r.name.startswith("0_"))
    assert "=" in job.name and "," in job.name  # Hydra's own naming: seed=0,train.steps=2
    proc = metarun(*base, f"init_from={job}", "train.steps=0", "run_dir=évaluation",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "évaluation" / "summary.json").read_text())
    assert summary["init_from"]["run"] == str(job) and summary["status"] == "completed"
    resumed = metarun(*base, "seed=0", "train.steps=2", f"train.resume={job}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr  # finished: evaluated again, same folder


def test_a_command_refused_at_the_config_check_writes_nothing(tmp_path, synthetic_jsonl):
    args = [*FAST, f"task.path={synthetic_jsonl}", "run_dir=run"]
    refused = metarun(*args, "train.lr=-1", cwd=tmp_path)
    assert refused.returncode == 2 and "train.lr=-1.0 is out of range" in refused.stderr
    assert not (tmp_path / "run").exists()
    assert metarun(*args, cwd=tmp_path).returncode == 0  # the corrected command, same folder


def split_folder(root: Path, train: list[str], valid: list[str], test: list[str]) -> Path:
    rows = synthetic_rows()
    (root / "splits" / "01").mkdir(parents=True)
    (root / "full.jsonl").write_text("".join(json.dumps({"sentence": r["text"],
                                                         "label": r["label"]}) + "\n"
                                             for r in rows))  # fmt: skip
    for name, labels in (("train", train), ("valid", valid), ("test", test)):
        (root / "splits" / "01" / f"labels.{name}.txt").write_text("\n".join(labels))
    return root


def test_evaluation_only_data_needs_no_train_classes(tmp_path):
    data = split_folder(tmp_path / "relations", [], [], ["weather", "music", "food", "sport"])
    args = [
        *FAST[:1],
        "task=local",
        f"task.data_dir={data}",
        "task.split=01",
        "task.way=3",
        "task.shots=2",
        "task.queries=2",
        "task.test_episodes=6",
        "logger.progress=false",
    ]
    proc = metarun(*args, "train.steps=0", "run_dir=eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["data"]["train"]["classes"] == 0 and summary["test"]["episodes"] == 6
    trains = metarun(*args, "train.steps=2", cwd=tmp_path)
    lines = trains.stderr.strip().splitlines()
    assert trains.returncode == 2 and len(lines) == 1
    assert "the train split has no classes (an empty labels.train.txt?)" in lines[0]


def test_labels_that_differ_only_in_case_are_named(tmp_path):
    rows = [{**r, "label": "Food"} if r["label"] == "food" and i % 2 else r
            for i, r in enumerate(synthetic_rows())]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = metarun(*FAST, f"task.path={path}", "train.steps=0", "run_dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run" / "metarun.log").read_text()
    assert "1 groups of labels differ only in case and are separate classes: Food / food" in log


def test_stop_signals_are_deferred_in_training_and_immediate_elsewhere():
    stop = StopSignals()
    with stop.installed():
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)  # the loop would see it after its step
            assert stop.requested
        err = stop.stopped(7, "runs/x")
        assert err.exit_code == 138 and str(err).startswith("interrupted by SIGUSR1 after step 7")
        with pytest.raises(RunInterrupted, match="interrupted by SIGTERM") as raised:
            os.kill(os.getpid(), signal.SIGTERM)  # outside training: stops at once
            time.sleep(1)
        assert raised.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    with stop.deferred():  # a training loop driven outside a run installs them itself
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGUSR1: the same handler, tested above
def test_preemption_saves_and_the_rerun_resumes_exactly(tmp_path, synthetic_jsonl, signum):
    """A cluster's SIGTERM or SIGUSR1: the step ends, last.pt is saved, the summary says
    interrupted and the exit code is 128 + the signal; the same command then resumes, and
    ends where the uninterrupted run ends."""
    args = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=24", "train.val_interval=8",
            "train.checkpoint_interval=4"]  # fmt: skip
    assert metarun(*args, "run_dir=ref", cwd=tmp_path).returncode == 0
    proc = start([*args, "run_dir=run"], tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and any(r.get("step", 0) >= 10 and "train/loss" in r
                                         for r in read_jsonl(metrics))):  # fmt: skip
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"metarun: error: interrupted by {name} after step ") and (
        "train.resume=run" in last
    )  # fmt: skip
    assert "Traceback" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and name in summary["error"]
    assert f"interrupted: interrupted by {name}" in (tmp_path / "run" / "metarun.log").read_text()
    again = metarun(*args, "run_dir=run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    done = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert done["test"] == ref["test"] and done["val"] == ref["val"]
    losses = [[(r["step"], r["train/loss"]) for r in read_jsonl(t / "metrics.jsonl")
               if "train/loss" in r] for t in (tmp_path / "ref", tmp_path / "run")]  # fmt: skip
    assert losses[0] == losses[1]
