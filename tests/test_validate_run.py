"""scripts/validate_run.py: a trained run's best weights on its own validation episodes under
other test-time settings, where such choices are made; the test classes are never read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from metarun.errors import MetarunError
from tests.cli_helpers import FAST, metarun
from tests.conftest import REPO, synthetic_rows


def load_script():
    path = REPO / "scripts" / "validate_run.py"
    spec = importlib.util.spec_from_file_location("validate_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ProtoNet meta-trained for 4 steps on the synthetic topics, validated every 2."""
    root = tmp_path_factory.mktemp("validate")
    (root / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    proc = metarun(*FAST, f"task.path={root / 'topics.jsonl'}", f"run_dir={root / 'run'}",
                   cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def test_as_trained_it_reproduces_the_runs_best_validation_reading_on_validation_classes_only(
    trained, tmp_path, monkeypatch
):
    """The first setting is the run as it was trained: its accuracy is the run's own best
    validation accuracy, from the same episodes; every episode evaluated is of valid classes."""
    script = load_script()
    seen: list[str] = []
    real = script.evaluate

    def spy(algo, episodes, autocast):
        seen.extend(c for ep in episodes for c in ep.classes)
        return real(algo, episodes, autocast)

    loaded = []
    load = script.load_task
    monkeypatch.setattr(script, "evaluate", spy)
    monkeypatch.setattr(script, "load_task", lambda cfg: loaded.append(load(cfg)) or loaded[-1])
    out = tmp_path / "validate.json"
    script.main([str(trained), "--set", "algo.metric=euclidean,cosine", "--out", str(out)])
    payload = json.loads(out.read_text())
    summary = json.loads((trained / "summary.json").read_text())
    first, second = payload["rows"]
    assert payload["episodes"] == summary["val"]["episodes"] == len(first["accuracies"])
    assert first["acc"] == pytest.approx(100 * summary["val"]["best_acc"])
    assert second["setting"] == ["algo.metric=cosine"] and first["paired"]["diff"] == 0.0
    diff = sum(second["accuracies"]) - sum(first["accuracies"])
    assert second["paired"]["diff"] == pytest.approx(100 * diff / len(first["accuracies"]))
    assert seen and all(set(seen) <= set(data.splits["valid"]) for data in loaded)
    assert not set(seen) & set(loaded[0].splits["test"])


def test_it_refuses_a_folder_without_weights_and_a_setting_without_values(trained, tmp_path):
    script = load_script()
    with pytest.raises(MetarunError, match=r"no \.hydra/overrides\.yaml"):
        script.main([str(tmp_path)])
    with pytest.raises(MetarunError, match="write key=value"):
        script.settings(["algo.metric"])


def test_a_reference_keeps_the_runs_data_model_and_machine_and_none_of_its_weights(
    trained, tmp_path, monkeypatch
):
    """`--reference`: an untrained model on the run's task, backbone and hardware, evaluated
    first on the same validation episodes; the run's settings pair with it."""
    script = load_script()
    fake = tmp_path / "run"
    (fake / ".hydra").mkdir(parents=True)
    (fake / "checkpoint.pt").write_bytes(b"")
    (fake / ".hydra" / "overrides.yaml").write_text(
        "- backbone=smollm2\n- task=banking77\n- task.split=02\n- hardware.threads=1\n"
        "- algo=fomaml\n- algo.inner_lr=0.003\n- train.steps=100\n- +experiment=meta_lora_llm\n"
        "- seed=3\n- run_dir=/x\n"
    )
    kept = script.reference_overrides(script.run_overrides(fake), "algo=maml algo.head=verbalizer")
    assert kept == ["backbone=smollm2", "task=banking77", "task.split=02", "hardware.threads=1",
                    "seed=3", "algo=maml", "algo.head=verbalizer", "train.steps=0",
                    "train.contrastive_steps=0"]  # fmt: skip
    sources = []
    build = script.build_model

    def spy(typed, *rest):
        sources.append(typed.init_from)
        return build(typed, *rest)

    monkeypatch.setattr(script, "build_model", spy)
    out = tmp_path / "validate.json"
    script.main([str(trained), "--reference", "algo=protonet", "--set", "algo.metric=cosine",
                 "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert sources == [None, str(trained.resolve())]
    assert rows[0]["setting"] == ["untrained:", "algo=protonet"]
    assert rows[1]["paired"]["diff"] == pytest.approx(
        100 * (sum(rows[1]["accuracies"]) - sum(rows[0]["accuracies"])) / len(rows[0]["accuracies"])
    )
