"""metarun-report: run folders -> tables, paired tests on identical episodes, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from metarun.report.cli import main
from metarun.report.runs import collect
from metarun.report.stats import holm, pair
from metarun.report.table import build, markdown
from tests.cli_helpers import FAST, metarun

CLASSES = [["a", "b", "c", "d", "e"], ["f", "g", "h", "i", "j"]]


def fake_run(root: Path, name: str, algo: str, split: str, accs: list[float], seed: int = 0,
             task: str = "banking77", eval_seed: int = 1234, steps: int = 60,
             overrides: list[str] = (), status: str = "completed",
             fingerprint: str | None = None, config: dict | None = None) -> Path:  # fmt: skip
    """A run folder as metarun leaves it, with per-episode accuracies `accs`."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    classes = [CLASSES[i % 2] + [split] for i in range(len(accs))]
    summary = {"status": status, "algo": algo, "task": task, "backbone": "minilm", "way": 5,
               "shots": 1, "seeds": {"split": split, "seed": seed, "eval_seed": eval_seed},
               "wall_seconds": 60.0, "train": {"steps_done": steps},
               "test": {"acc": float(np.mean(accs)), "acc_ci95": 0.01,
                        "episodes": len(accs)}}  # fmt: skip
    if fingerprint:
        summary["data"] = {"fingerprint": fingerprint}
    (run / "summary.json").write_text(json.dumps(summary))
    base = {"train": {"steps": steps}, "seed": seed, "task": {"eval_seed": eval_seed},
            "algo": {"_target_": f"metarun.algo.x.{algo}"}}  # fmt: skip
    for key, value in (config or {}).items():
        base[key] = {**base.get(key, {}), **value}
    (run / "config.yaml").write_text(yaml.safe_dump(base))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"algo={algo}", *overrides]))
    episodes = {"eval_seed": eval_seed, "accuracy": accs, "classes": classes}
    (run / "test_episodes.json").write_text(json.dumps(episodes))
    return run


def episodes(mean: float, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.clip(rng.normal(mean, 0.1, n), 0, 1).round(2))


def test_seed_sweep_is_replicates_and_the_paired_difference_is_per_episode(tmp_path):
    a, b = {}, {}
    for split in ("01", "02"):
        for seed in (0, 1):
            a[(split, seed)] = episodes(0.8, 40, seed + 10 * int(split))
            b[(split, seed)] = episodes(0.7, 40, seed + 10 * int(split) + 100)
            fake_run(tmp_path, f"p{split}{seed}", "protonet", split, a[(split, seed)], seed)
            fake_run(tmp_path, f"m{split}{seed}", "maml", split, b[(split, seed)], seed)
    runs, notes = collect([tmp_path])
    assert len(runs) == 8 and not notes
    (report,) = build(runs)
    best, _ = report.lines
    assert best.row[0] == "protonet, 60 steps" and len(best.runs) == 4
    (comparison,) = report.comparisons
    flat_a, flat_b = (np.concatenate([x[k] for k in sorted(x)]) for x in (a, b))
    diffs = 100 * (flat_b - flat_a)
    p = comparison.paired
    assert p.episodes == 160 and p.mean == pytest.approx(diffs.mean())
    assert p.low < p.mean < p.high < 0
    assert p.p == pytest.approx(stats.wilcoxon(diffs, zero_method="pratt").pvalue)
    assert p.p_holm == p.p and p.significant  # one comparison: Holm changes nothing
    text = markdown(report)
    assert f"{p.mean:+.2f}" in text and "*" in text and "ProtAugment (published)" in text


def test_holm_is_monotone_and_never_below_the_raw_p():
    raw = [0.01, 0.04, 0.03, float("nan"), 0.5]
    adjusted = holm(raw)
    assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.09)
    assert adjusted[1] == pytest.approx(0.09) and adjusted[4] == pytest.approx(0.5)
    assert adjusted[3] != adjusted[3]  # NaN stays NaN


def test_runs_on_other_episodes_are_never_paired_and_the_report_says_so(tmp_path):
    a = fake_run(tmp_path, "a", "protonet", "01", episodes(0.8, 20, 0))
    b = fake_run(tmp_path, "b", "maml", "01", episodes(0.7, 20, 1), eval_seed=99)
    runs, _ = collect([tmp_path])
    (report,) = build(runs)
    (comparison,) = report.comparisons
    assert (
        comparison.paired.episodes == 0 and "eval_seed 99 vs 1234" in comparison.paired.unpaired[0]
    )
    assert "not paired" in markdown(report) and "Not paired" in markdown(report)
    by_replicate = {("01", 0): next(r for r in runs if r.folder == a)}
    other = {("01", 0): next(r for r in runs if r.folder == b)}
    other[("01", 0)].eval_seed = 1234
    other[("01", 0)].classes = [["x"]] * 20  # another class split: not the same episodes
    assert pair(by_replicate, other).episodes == 0


def test_the_first_n_episodes_of_a_longer_run_pair_with_a_shorter_run(tmp_path):
    fake_run(tmp_path, "long", "protonet", "01", episodes(0.8, 60, 0))
    fake_run(tmp_path, "short", "icl", "01", episodes(0.6, 20, 1))
    (report,) = build(collect([tmp_path])[0])
    assert report.comparisons[0].paired.episodes == 20


def test_methods_split_by_their_overrides_and_published_rows_stay_in_their_task(tmp_path):
    fake_run(tmp_path, "lin", "maml", "01", episodes(0.8, 10, 0))
    options = ["algo.head=verbalizer", "logger=wandb", "train.resume=x", "task.split=01"]
    fake_run(tmp_path, "verb", "maml", "01", episodes(0.7, 10, 1), overrides=options)
    fake_run(tmp_path, "c", "maml", "01", episodes(0.7, 10, 1), task="clinc150")
    fake_run(tmp_path, "failed", "maml", "02", episodes(0.1, 10, 1), status="failed")
    reused = fake_run(tmp_path, "reused", "maml", "01", episodes(0.7, 10, 2), steps=0)
    summary = json.loads((reused / "summary.json").read_text())
    (reused / "summary.json").write_text(json.dumps(summary | {"init_from": {"run": "x/b77"}}))
    fake_run(
        tmp_path,
        "named",
        "maml",
        "01",
        episodes(0.7, 10, 3),
        overrides=["task.names_as_examples=true"],
    )  # a task option that changes the method
    protocol = ["+experiment=protaugment", "task=banking77"]  # a protocol, not a method
    fake_run(tmp_path, "proto", "maml", "01", episodes(0.7, 10, 4), overrides=protocol)
    recipe = ["+experiment=[protaugment,recommended]", "task=banking77"]  # sets algo and train
    fake_run(tmp_path, "recipe", "protonet", "01", episodes(0.7, 10, 5), overrides=recipe)
    runs, _ = collect([tmp_path])
    assert {r.method for r in runs} == {"maml, 60 steps", "maml, head=verbalizer, 60 steps",
                                        "maml, from b77, no further training",
                                        "maml, task.names_as_examples=true, 60 steps",
                                        "protonet, experiment=recommended, 60 steps"}  # fmt: skip
    reports = build(runs)
    assert [r.title for r in reports] == ["banking77, 5-way 1-shot", "clinc150, 5-way 1-shot"]
    assert "published" in markdown(reports[0]) and "published" not in markdown(reports[1])


def test_report_writes_markdown_plots_and_the_docs_block(tmp_path, capsys):
    for seed in (0, 1):
        fake_run(tmp_path / "runs", f"p{seed}", "protonet", "01", episodes(0.8, 10, seed), seed)
        fake_run(tmp_path / "runs", f"m{seed}", "maml", "01", episodes(0.7, 10, seed + 5), seed)
    docs = tmp_path / "RESULTS.md"
    docs.write_text("intro\n<!-- report:results:begin -->\nold\n<!-- report:results:end -->\nend\n")
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--update", str(docs),
          "--pair", "maml, 60 steps", "protonet, 60 steps"])  # fmt: skip
    out = capsys.readouterr().out
    assert "paired difference from the best" in out
    report_md = (tmp_path / "rep" / "report.md").read_text()
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs and all(f"]({name})" in report_md for name in pngs)
    assert any(n.startswith("accuracy_") for n in pngs)
    assert all((tmp_path / "rep" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
    text = docs.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    assert "protonet, 60 steps" in text


def test_report_on_a_real_multirun_of_two_algorithms_and_two_seeds(tmp_path, synthetic_jsonl):
    proc = metarun("-m", *FAST, f"task.path={synthetic_jsonl}", "algo=protonet,matchingnet",
                   "seed=0,1", "train.steps=2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = metarun_report(tmp_path, "outputs/multirun", "--out", "rep")
    assert proc.returncode == 0, proc.stderr
    assert "| 2 (" in proc.stdout  # two seeds are two replicates of one method
    assert "paired difference from the best" in proc.stdout and "[" in proc.stdout
    assert (tmp_path / "rep" / "report.md").is_file() and list((tmp_path / "rep").glob("*.png"))


def metarun_report(cwd: Path, *args: str):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("metarun-report")
    cmd = [exe] if exe else [sys.executable, "-m", "metarun.report.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_report_logs_its_tables_and_plots_to_a_wandb_report_run(tmp_path, monkeypatch):
    from tests.cli_helpers import item_key, wandb_records

    fake_run(tmp_path / "runs", "p", "protonet", "01", episodes(0.8, 10, 0))
    fake_run(tmp_path / "runs", "m", "maml", "01", episodes(0.6, 10, 1))
    monkeypatch.chdir(tmp_path)
    main([str(tmp_path / "runs"), "--out", "rep", "--wandb"])
    assert "WANDB_SERVICE" not in os.environ  # later metarun subprocesses start their own
    (wandb_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(wandb_file))
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.job_type == "report"
    logged = {item_key(i) for r in records if r.HasField("history") for i in r.history.item}
    assert any(k.startswith("report/banking77, 5-way 1-shot/") for k in logged)  # the table
    assert any(k.startswith("plots/accuracy_banking77_5way/") for k in logged)


def test_two_datasets_sharing_a_name_are_two_tasks_and_broken_folders_are_skipped(tmp_path):
    """Two files both called data.jsonl hold other texts: their runs are never averaged or
    paired. A truncated summary.json is skipped with one line; the rest is reported."""
    for i, fp in enumerate(("aaaa1111", "bbbb2222", "aaaa1111")):
        fake_run(tmp_path, f"r{i}", "protonet", "01", episodes(0.8, 20, i), seed=i,
                 task="data", fingerprint=fp)  # fmt: skip
    old = fake_run(tmp_path, "old", "protonet", "01", episodes(0.8, 20, 9), seed=9, task="data")
    broken = fake_run(tmp_path, "broken", "maml", "01", episodes(0.7, 20, 3))
    text = (broken / "summary.json").read_text()
    (broken / "summary.json").write_text(text[: len(text) // 2])
    runs, notes = collect([tmp_path])
    tasks = sorted({r.task for r in runs})
    assert tasks == ["data [aaaa1111]", "data [bbbb2222]", "data [no fingerprint]"]
    assert sum(r.task == "data [aaaa1111]" for r in runs) == 2
    assert any(r.folder == old for r in runs)
    assert len(notes) == 1 and notes[0].startswith(f"skipped {broken.resolve()}: unreadable")


def test_report_refuses_a_pair_that_matches_nothing_and_an_out_that_is_a_file(tmp_path, capsys):
    fake_run(tmp_path / "runs", "p", "protonet", "01", episodes(0.8, 20, 0))
    fake_run(tmp_path / "runs", "m", "maml", "01", episodes(0.7, 20, 1))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "runs"), "--pair", "protonet, 60 steps", "mmaml", "--no-plots",
              "--out", str(tmp_path / "rep")])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--pair 'mmaml' names no single method" in err and "maml, 60 steps @ minilm" in err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--no-plots", "--out", str(tmp_path / "file")])
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_every_row_says_its_setting_and_published_rows_their_source(tmp_path):
    recipe = {"algo": {"transductive_steps": 3}, "task": {"names_as_examples": True}}
    fake_run(tmp_path, "trans", "protonet", "01", episodes(0.9, 20, 0), config=recipe)
    fake_run(tmp_path, "ind", "frozen", "01", episodes(0.8, 20, 1))
    verbalizer = {"algo": {"head": "verbalizer"}}
    fake_run(tmp_path, "verb", "maml", "01", episodes(0.7, 20, 2), config=verbalizer,
             overrides=["algo.head=verbalizer"])  # fmt: skip
    (report,) = build(collect([tmp_path])[0])
    settings = {line.row[0]: line.setting for line in report.lines}
    assert settings == {
        "protonet, 60 steps": "transductive, class names, extra data: none",
        "frozen, 60 steps": "inductive, no names, extra data: none",
        "maml, head=verbalizer, 60 steps": "inductive, class names, extra data: none",
    }
    text = markdown(report)
    assert (
        "| protonet, 60 steps | minilm (22.7M) | transductive, class names, extra data: none |"
        in text
    )
    published = [line for line in text.splitlines() if "ProtAugment (published)" in line]
    assert published and "Dopierre et al., ACL 2021" in published[0]
    assert "augmentation (paraphrases)" in published[0] and "bert-base (110M)" in published[0]


def test_evaluations_from_trained_runs_of_one_method_are_replicates_of_one_row(tmp_path):
    sources = [fake_run(tmp_path / "train", f"s{split}", "protonet", split,
                        episodes(0.8, 20, int(split)), task="banking77")
               for split in ("01", "02")]  # fmt: skip
    for source, split in zip(sources, ("01", "02"), strict=True):
        run = fake_run(tmp_path / "eval", f"e{split}", "protonet", split,
                       episodes(0.7, 20, 10 + int(split)), task="clinc150", steps=0)  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        summary["init_from"] = {"run": str(source)}
        (run / "summary.json").write_text(json.dumps(summary))
    runs, _ = collect([tmp_path / "eval"])
    (report,) = build(runs)
    (line,) = report.lines
    assert line.row[0] == "protonet, from (protonet, 60 steps, on banking77), no further training"
    assert len(line.runs) == 2


def test_runs_reached_through_symbolic_links_count_once_and_a_loop_ends(tmp_path):
    """A folder of links to chosen runs is reported like the runs themselves; a run reached
    both directly and through a link is one run, and a link back up the tree is not followed
    forever."""
    real = tmp_path / "all"
    a = fake_run(real, "a", "protonet", "01", episodes(0.8, 20, 0))
    fake_run(real, "b", "maml", "01", episodes(0.7, 20, 1))
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "a").symlink_to(a, target_is_directory=True)
    (picked / "up").symlink_to(tmp_path, target_is_directory=True)
    runs, notes = collect([picked])
    assert sorted(r.folder.name for r in runs) == ["a", "b"] and not notes
    only_link = tmp_path / "only"
    only_link.mkdir()
    (only_link / "a").symlink_to(a, target_is_directory=True)
    (runs_a,) = collect([only_link])[0]
    assert runs_a.folder == a.resolve() and runs_a.episodes == pytest.approx(episodes(0.8, 20, 0))
