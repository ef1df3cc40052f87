"""scripts/validation_pilot.py, where the recipe's evaluation choices were made: it encodes only
validation texts and names, and runs end to end on the real validation classes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from metarun.task import TaskData
from tests.conftest import REPO, SHARED_DATA


def load_pilot():
    spec = importlib.util.spec_from_file_location("pilot", REPO / "scripts" / "validation_pilot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pilot_encodes_only_validation_texts_and_their_names():
    """What `validation_ids` returns is all the pilot's cache holds, and the backbone's cache
    refuses any other id (tests/test_backbone.py), so test texts cannot be read."""
    pilot = load_pilot()
    data = TaskData(
        texts=[f"text {i}" for i in range(12)],
        splits={"train": {"a": np.array([0, 1])}, "valid": {"b": np.array([2, 3]),
                "c": np.array([4, 5])}, "test": {"d": np.array([6, 7])}},
        label_names={"a": "A", "b": "B", "c": "C", "d": "D"},
        name_ids={"a": 8, "b": 9, "c": 10, "d": 11},
    )  # fmt: skip
    assert pilot.validation_ids(data).tolist() == [2, 3, 4, 5, 9, 10]


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "banking77").is_dir(), reason="../shared/data is absent")
def test_pilot_compares_every_head_on_validation_episodes(tmp_path):
    out = tmp_path / "pilot.json"
    proc = subprocess.run(
        [sys.executable, "scripts/validation_pilot.py", "--data", str(SHARED_DATA),
         "--task", "banking77", "--episodes", "8", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    cells = {(r["shots"], r["names"], r["head"]) for r in rows}
    assert len(rows) == len(cells) == 2 * 2 * 5  # shots x names x heads, each once
    assert all(20 < r["val_acc"] <= 100 for r in rows)  # chance is 20% at 5-way


@pytest.mark.parametrize("centre,with_prototypes", [(False, False), (True, False), (False, True)])
def test_the_lever_heads_are_inductive_probabilities(tiny_encoder, synthetic_task, centre,
                                                     with_prototypes):  # fmt: skip
    """Each 5-shot lever classifies a query from the support set alone (its scores do not move
    when other queries are added) and scores are log-probabilities."""
    import torch

    from metarun.task import fixed_episodes

    pilot = load_pilot()
    tiny_encoder.set_texts(synthetic_task.texts)
    head = pilot.Lever(tiny_encoder, 3, 1.0, centre, with_prototypes).eval()
    (ep,) = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 1, 0, "test")
    with torch.no_grad():
        predict = head.adapt(ep.support, 3)
        together = predict(ep.query)
        alone = predict(type(ep.query)(ep.query.ids[:1], ep.query.labels[:1], ep.query.classes))
    assert torch.allclose(together[:1], alone, atol=1e-5)
    assert torch.allclose(together.exp().sum(-1), torch.ones(len(together)), atol=1e-4)
