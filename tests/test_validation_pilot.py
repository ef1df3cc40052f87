"""scripts/validation_pilot.py, where the recipe's evaluation choices were made: it encodes only
validation texts, and runs end to end on the real validation classes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA


def load_pilot():
    spec = importlib.util.spec_from_file_location("pilot", REPO / "scripts" / "validation_pilot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_serves_only_the_texts_it_encoded():
    pilot = load_pilot()
    encoder = lambda ids: torch.stack([ids.float(), -ids.float()], dim=1)  # noqa: E731
    table = pilot.Embedded(encoder, torch.tensor([3, 7, 11]), batch=2)
    assert torch.equal(table(torch.tensor([11, 3])), torch.tensor([[11.0, -11.0], [3.0, -3.0]]))
    with pytest.raises(KeyError, match="outside the embedded"):
        table(torch.tensor([3, 5]))  # 5 was never encoded (a test text, say)


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
