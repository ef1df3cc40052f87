"""Data sources, class splits and episode samplers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.config import TaskConfig
from metarun.errors import MetarunError
from metarun.task import EpisodeSampler, check_feasible, fixed_episodes, load_task
from metarun.task.data import seeded_class_split
from metarun.task.labels import readable
from tests.conftest import synthetic_rows


def _split_dir(root: Path, rows: list[dict], splits: dict[str, list[str]]) -> Path:
    (root / "splits" / "01").mkdir(parents=True)
    (root / "full.jsonl").write_text(
        "".join(json.dumps({"sentence": r["text"], "label": r["label"]}) + "\n" for r in rows)
    )
    for name, labels in splits.items():
        (root / "splits" / "01" / f"labels.{name}.txt").write_text("\n".join(labels) + "\n")
    return root


def test_icd10_collapses_encounter_variants_and_splits_disjointly():
    data = load_task(TaskConfig(source="icd10", shots=1, queries=5))
    texts = data.texts
    assert len(texts) > 20_000
    assert not any("initial encounter" in t or t.endswith(", sequela") for t in texts)
    assert len(set(texts)) == len(texts)  # one id per distinct text
    classes = [set(data.splits[s]) for s in ("train", "valid", "test")]
    assert all(len(c) > 100 for c in classes)
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
    import icd10

    code = next(iter(data.splits["test"]))
    assert data.label_names[code] == icd10.codes[code][1]  # the category header, readable


def test_class_split_depends_on_split_seed_only():
    labels = [f"c{i}" for i in range(50)]
    a = seeded_class_split(labels, [0.6, 0.2, 0.2], seed=0)
    assert a == seeded_class_split(list(reversed(labels)), [0.6, 0.2, 0.2], seed=0)
    assert a != seeded_class_split(labels, [0.6, 0.2, 0.2], seed=1)
    assert [len(a[s]) for s in ("train", "valid", "test")] == [30, 10, 10]
    with pytest.raises(MetarunError, match=r"task\.class_split"):
        seeded_class_split(labels, [0.5, 0.2, 0.2], seed=0)


def test_split_dir_uses_published_classes(tmp_path):
    rows = synthetic_rows(per_class=8)
    splits = {
        "train": ["weather", "music", "food"],
        "valid": ["sport", "travel"],
        "test": ["money", "health"],
    }
    root = _split_dir(tmp_path / "d", rows, splits)
    data = load_task(TaskConfig(data_dir=str(root), way=2, shots=1, queries=2))
    assert {s: sorted(c) for s, c in data.splits.items()} == {
        s: sorted(v) for s, v in splits.items()
    }
    assert all(len(ids) == 8 for ids in data.splits["train"].values())
    assert data.texts[data.splits["test"]["money"][0]] in {r["text"] for r in rows}


def test_split_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(MetarunError, match=r"task.data_dir=.*does not exist"):
        load_task(TaskConfig(data_dir=str(tmp_path / "nope")))
    root = _split_dir(
        tmp_path / "d", synthetic_rows(4), {"train": ["dog_show"], "valid": [], "test": []}
    )
    with pytest.raises(MetarunError, match="dog_show"):
        load_task(TaskConfig(data_dir=str(root)))
    with pytest.raises(MetarunError, match=r"task\.split to one of: 01"):
        load_task(TaskConfig(data_dir=str(root), split="07"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_of_each_format(tmp_path, suffix):
    import pandas as pd

    df = pd.DataFrame([{"utterance": r["text"], "intent": r["label"]} for r in synthetic_rows(7)])
    path = tmp_path / f"data{suffix}"
    {
        ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
        ".csv": lambda: df.to_csv(path, index=False),
        ".parquet": lambda: df.to_parquet(path),
    }[suffix]()
    cfg = TaskConfig(path=str(path), text_column="utterance", label_column="intent", shots=2)
    data = load_task(cfg)
    assert sum(len(s) for s in data.splits.values()) == 12
    assert data.summary()["train"]["texts"] == 7 * len(data.splits["train"])


def test_missing_column_names_the_file_the_column_and_the_fix(synthetic_jsonl):
    with pytest.raises(MetarunError) as err:
        load_task(TaskConfig(path=str(synthetic_jsonl), label_column="intent"))
    message = str(err.value)
    assert str(synthetic_jsonl) in message and "'intent'" in message
    assert "task.label_column=" in message and "label, text" in message


def test_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(MetarunError, match="does not exist"):
        load_task(TaskConfig(path=str(tmp_path / "missing.csv")))


def test_small_classes_dropped_and_counted(tmp_path):
    rows = synthetic_rows(per_class=10)
    rows = [r for r in rows if r["label"] != "car" or r["text"] in {x["text"] for x in rows[-3:]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task(TaskConfig(path=str(path), shots=2, queries=2))
    kept = {c for s in data.splits.values() for c in s}
    assert "car" not in kept and len(kept) == 11
    assert sum(data.dropped.values()) == 1


def test_infeasible_way_fails_before_training(synthetic_task):
    cfg = TaskConfig(way=5, shots=1, queries=2)
    with pytest.raises(MetarunError, match=r"task.way=5 but the valid split has only 3 classes"):
        check_feasible(synthetic_task, cfg, ("train", "valid", "test"))
    check_feasible(synthetic_task, TaskConfig(way=3), ("test",))


def test_episode_shape_labels_and_disjoint_support_query(synthetic_task):
    sampler = EpisodeSampler(synthetic_task.splits["train"], way=4, shot=2, queries=3, seed=0)
    ep = sampler.sample()
    assert (ep.way, ep.shot, len(ep.support), len(ep.query)) == (4, 2, 8, 12)
    assert torch.bincount(ep.support.labels).tolist() == [2, 2, 2, 2]
    assert torch.bincount(ep.query.labels).tolist() == [3, 3, 3, 3]
    assert not set(ep.support.ids.tolist()) & set(ep.query.ids.tolist())
    for ids, labels in ((ep.support.ids, ep.support.labels), (ep.query.ids, ep.query.labels)):
        for i, label in zip(ids.tolist(), labels.tolist(), strict=True):
            assert i in synthetic_task.splits["train"][ep.classes[label]]


def test_samplers_own_their_generators_and_checkpoint(synthetic_task):
    classes = synthetic_task.splits["train"]
    a, b = (EpisodeSampler(classes, 3, 1, 2, seed=7) for _ in range(2))
    np.random.seed(123)
    torch.manual_seed(123)  # global RNGs must not matter
    first = a.sample()
    assert torch.equal(first.query.ids, b.sample().query.ids)
    state = a.state_dict()
    nxt = a.sample()
    b.load_state_dict(state)
    assert torch.equal(nxt.support.ids, b.sample().support.ids)


def test_fixed_episodes_identical_across_calls_and_independent_per_split(synthetic_task):
    classes = synthetic_task.splits["test"]
    one = fixed_episodes(classes, 3, 1, 2, n=5, seed=9, split="test")
    two = fixed_episodes(classes, 3, 1, 2, n=5, seed=9, split="test")
    assert all(torch.equal(x.query.ids, y.query.ids) for x, y in zip(one, two, strict=True))
    other = fixed_episodes(classes, 3, 1, 2, n=5, seed=10, split="test")
    assert any(not torch.equal(x.query.ids, y.query.ids) for x, y in zip(one, other, strict=True))


def test_readable_label_names():
    assert readable("card_payment_wrong_exchange_rate") == "card payment wrong exchange rate"


def test_split_dir_falls_back_to_the_split_formats_label_field(tmp_path):
    """task=clinc150 names its hub column 'intent'; a ProtAugment folder calls it 'label'."""
    rows = [{"text": f"text {c} {i}", "label": c} for c in "abcdefghi" for i in range(3)]
    splits = {"train": ["a", "b", "c"], "valid": ["d", "e", "f"], "test": ["g", "h", "i"]}
    root = _split_dir(tmp_path / "d", rows, splits)
    cfg = TaskConfig(data_dir=str(root), label_column="intent", way=2, shots=1, queries=1)
    data = load_task(cfg)
    assert sorted(data.splits["test"]) == ["g", "h", "i"]
    assert all(len(ids) == 3 for ids in data.splits["train"].values())


def test_names_as_examples_add_one_named_example_per_class_and_keep_the_draws(synthetic_jsonl):
    plain = load_task(TaskConfig(path=str(synthetic_jsonl), shots=2, queries=2))
    named = load_task(TaskConfig(path=str(synthetic_jsonl), shots=2, queries=2,
                                 names_as_examples=True))  # fmt: skip
    assert plain.name_ids == {} and named.texts[: len(plain.texts)] == plain.texts
    assert all(named.texts[i] == named.label_names[c] for c, i in named.name_ids.items())
    split = named.splits["test"]
    a = fixed_episodes(split, 3, 2, 2, 5, 0, "test")
    b = fixed_episodes(split, 3, 2, 2, 5, 0, "test", named.name_ids)
    for x, y in zip(a, b, strict=True):
        assert x.classes == y.classes and torch.equal(x.query.ids, y.query.ids)
        assert torch.equal(y.support.ids[:6], x.support.ids) and len(y.support) == 9
        names = y.support.ids[6:].tolist()
        assert names == [named.name_ids[c] for c in y.classes]
        assert y.support.labels[6:].tolist() == [0, 1, 2] and y.shot == 2
