"""The catalogue of ordinary mistakes: each gives one clear line and exit 2 (or a correct
result), no traceback, and leaves a run folder it must not touch byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import FAST, metarun, read_jsonl, run_dirs
from tests.conftest import synthetic_rows

DONE = "done"  # the folder of a finished run, copied into the case's directory


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data(change: Callable[[int, dict], dict | None] | None = None) -> Callable[[Path], None]:
    """A case's data.jsonl: the synthetic topics, each row passed through `change`."""

    def make(root: Path) -> None:
        rows = [change(i, r) if change else r for i, r in enumerate(synthetic_rows())]
        write_jsonl(root / "data.jsonl", [r for r in rows if r is not None])

    return make


def split_dir(test_classes: list[str]) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        rows = synthetic_rows()
        (root / "split" / "splits" / "01").mkdir(parents=True)
        write_jsonl(root / "split" / "full.jsonl", [{"sentence": r["text"], "label": r["label"]}
                                                    for r in rows])  # fmt: skip
        labels = sorted({r["label"] for r in rows})
        parts = {"train": labels[:6], "valid": labels[6:9], "test": test_classes}
        for name, names in parts.items():
            (root / "split" / "splits" / "01" / f"labels.{name}.txt").write_text("\n".join(names))

    return make


def raw_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(content)


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str  # in the one error line (exit 2); exit 0: in summary.json, or "N classes"
    setup: Callable[[Path], None] = field(default_factory=data)
    code: int = 2
    folder: str | None = None  # DONE: a finished run to point run_dir / train.resume at
    unchanged: bool = False  # the folder must be byte-identical afterwards
    extra: list[str] = field(default_factory=list)


TOPICS = sorted({r["label"] for r in synthetic_rows()})
TEST_CLASS = "travel"  # a test class of FAST's seeded 6 / 3 / 3 split of the topics
CASES = [
    # Results that were silently wrong
    Case("overlapping-splits", ["task.path=split"], "labels.train.txt and labels.test.txt share 2",
         split_dir([*TOPICS[9:], TOPICS[0], TOPICS[1]])),
    Case("missing-labels", [], "48 of 144 rows of task.path=data.jsonl lack a text or a label",
         data(lambda i, r: {**r, "label": None} if i % 3 == 0 else r)),
    Case("missing-labels-dropped", ["task.on_invalid_rows=drop"], '"invalid_dropped": 48',
         data(lambda i, r: {**r, "label": None} if i % 3 == 0 else r), code=0),
    Case("mixed-label-types", [], "12 classes", data(
        lambda i, r: {**r, "label": 3 if i % 2 else "3"} if r["label"] == "food" else r), code=0),
    Case("empty-texts", [], "lack a text or a label (line 6)",
         data(lambda i, r: {**r, "text": "  "} if i == 5 else r)),
    Case("text-under-two-labels", [], '"multi_label_texts": 1',
         data(lambda i, r: {**r, "text": "shared words"} if i in (0, 20) else r), code=0),
    Case("negative-steps", ["train.steps=-5"], "train.steps=-5 is out of range: it must be >= 0"),
    Case("tiny-max-length", ["backbone.max_length=2"], "backbone.max_length=2 is out of range"),
    Case("zero-inner-steps", ["algo=maml", "algo.inner_steps=0"], "algo.inner_steps=0 is out of"),
    Case("one-test-episode", ["task.test_episodes=1"], "task.test_episodes=1 is out of range"),
    Case("misspelt-key", ["train.stepz=3"], "train.stepz is not a key of train; did you mean "
         "train.steps?"),
    Case("misspelt-key-added", ["+train.stepz=3"], "did you mean train.steps?"),
    # Raw tracebacks where one line is owed
    Case("empty-file", [], "holds no rows", raw_file("data.jsonl", b"")),
    Case("malformed-json-line", [], "data.jsonl, line 2: not valid JSON",
         raw_file("data.jsonl", b'{"text": "a", "label": "x"}\n{"text": b}\n')),
    Case("not-utf8", ["task.path=data.csv"], "set task.encoding=",
         raw_file("data.csv", "text,label\ncaf\xe9,x\n".encode("latin-1"))),
    Case("negative-lr", ["train.lr=-1"], "train.lr=-1.0 is out of range: it must be > 0"),
    Case("zero-val-interval", ["train.val_interval=0"], "train.val_interval=0 is out of range"),
    Case("way-one", ["task.way=1"], "task.way=1 is out of range: it must be >= 2"),
    Case("way-too-large", ["task.way=7"], "task.way=7 but the train split has only 6 classes"),
    Case("too-few-texts", ["task.shots=30"], "an episode needs at least 2"),
    Case("missing-column", ["task.label_column=intent"], "no column 'intent'"),
    # Run folders never damaged
    Case("rerun-without-state", ["run_dir=done"], "holds another run", folder=DONE,
         unchanged=True, extra=["no-state"]),
    Case("refused-resume", ["train.resume=done", "task.shots=1"], "cannot resume done: the "
         "config differs (task.shots: 2 -> 1)", folder=DONE, unchanged=True),
    Case("corrupt-state", ["train.resume=done"], "done/last.pt is not a readable metarun "
         "checkpoint", folder=DONE, unchanged=True, extra=["corrupt"]),
    # No code from configs
    Case("target-in-added-node", ["+algo.extra={_target_:builtins.print,_args_:[PWNED]}"],
         "algo.extra is not a key of algo"),
    Case("target-outside-metarun", ["algo._target_=os.system"], "algo._target_=os.system is "
         "outside metarun's modules: to build your own algorithm class, allow its module with "
         "algo_modules=[os]"),
    Case("target-not-an-algorithm", ["algo._target_=os.system", "algo_modules=[os]"],
         "is a builtin_function_or_method, not a metarun Algorithm"),
    # Seeds, episode counts and folders that used to end in a traceback
    Case("negative-seed", ["seed=-1"], "seed=-1 is out of range: it must be >= 0"),
    Case("huge-eval-seed", ["task.eval_seed=4294967296"], "task.eval_seed=4294967296 is out of "
         "range: it must be < 4294967296"),
    Case("negative-split-seed", ["task.split_seed=-3"], "task.split_seed=-3 is out of range"),
    Case("episodes-typo", ["task.test_episodes=100000000"], "task.test_episodes=100000000 is out "
         "of range: it must be <= 100000"),
    Case("run-dir-is-a-file", ["run_dir=data.jsonl"], "run_dir=data.jsonl is a file"),
    Case("resume-is-a-file", ["train.resume=data.jsonl"], "train.resume=data.jsonl is a file"),
    Case("sweep-into-one-folder", ["-m", "train.steps=2,6", "run_dir=same"], "run_dir=same names "
         "one folder, but -m runs a sweep"),
    Case("resume-on-other-data", ["train.resume=done"], "cannot resume done: the task's data "
         "changed since the run started (the same counts, other texts or labels)",
         data(lambda i, r: {**r, "text": r["text"] + " again"} if i == 0 else r), folder=DONE,
         unchanged=True),
    Case("resume-on-fewer-rows", ["train.resume=done"], "the task's data changed since the run "
         "started (test 3 -> 3 classes, ",
         data(lambda i, r: None if r["label"] == TEST_CLASS and i % 12 == 0 else r),
         folder=DONE, unchanged=True),
    Case("instantiate-keys", ["algo=icl", "backbone=tiny-gpt2", "+algo._args_=[1]"],
         "algo._args_ is not a key of algo"),
]  # fmt: skip


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    data()(root)
    proc = metarun(*FAST, "task.path=data.jsonl", "run_dir=done", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "done"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(tmp_path, finished_run, case: Case):
    case.setup(tmp_path)
    folder = None
    if case.folder == DONE:
        folder = tmp_path / "done"
        shutil.copytree(finished_run, folder)
        if "corrupt" in case.extra:
            state = folder / "last.pt"
            state.write_bytes(state.read_bytes()[:300])
        if "no-state" in case.extra:  # a run that cannot be resumed (train.steps=0, a crash)
            (folder / "last.pt").unlink()
    before = checksums(folder) if folder else {}
    overrides = [a for a in case.extra if "=" in a]
    proc = metarun(*FAST, "task.path=data.jsonl", *case.args, *overrides, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "PWNED" not in proc.stdout.replace("PWNED]", "")
    assert "weights_only" not in out
    assert proc.returncode == case.code, out
    if case.code == 2:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("metarun: error: ") and case.expect in lines[0], lines[0]
    else:
        (run,) = run_dirs(tmp_path)
        summary = (run / "summary.json").read_text()
        splits = json.loads(summary)["data"]
        total = sum(splits[s]["classes"] for s in ("train", "valid", "test"))
        assert '"status": "completed"' in summary
        assert case.expect in summary or case.expect == f"{total} classes"
    if case.unchanged:
        assert checksums(folder) == before


def test_overwrite_starts_afresh_instead_of_appending(tmp_path, finished_run):
    shutil.copytree(finished_run, tmp_path / "done")
    (tmp_path / "done" / "last.pt").unlink()  # a run that cannot be resumed
    data()(tmp_path)
    args = [*FAST, "task.path=data.jsonl", "run_dir=done"]
    assert metarun(*args, cwd=tmp_path).returncode == 2  # refused: it holds another run
    proc = metarun(*args, "run_dir_mode=overwrite", "train.steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = [
        r["step"] for r in read_jsonl(tmp_path / "done" / "metrics.jsonl") if "train/loss" in r
    ]
    assert steps == [1, 2]  # the earlier run's lines are gone, not followed by these


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    data()(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt.tmp").write_bytes(b"x" * 1000)  # left by a killed write
    proc = metarun(*FAST, "task.path=data.jsonl", "run_dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "run").glob("*.tmp"))
    hydra_dir = tmp_path / "run" / ".hydra"  # all in the run folder, as Hydra would write it
    assert "task.path=data.jsonl" in (hydra_dir / "overrides.yaml").read_text()
    composed = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    assert composed["task"]["path"] == "data.jsonl" and composed["algo"]["_target_"]
    assert "run" in yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]
    assert "test accuracy" in (tmp_path / "run" / "metarun.log").read_text()


def test_a_failing_job_leaves_the_sweep_running(tmp_path):
    data()(tmp_path)
    proc = metarun("-m", *FAST, "task.path=data.jsonl", "task.shots=0,2,30", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    runs = sorted(run_dirs(tmp_path), key=lambda r: int(r.name.split("_")[0]))
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [s["status"] for s in summaries] == ["failed", "completed", "failed"]
    assert "task.shots=0 is out of range" in summaries[0]["error"]
    assert "an episode needs at least 2" in summaries[2]["error"]
    assert "an episode needs at least 2" in (runs[2] / "metarun.log").read_text()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("metarun: error: 2 job(s) of the sweep failed") and "job 0" in last
