"""The outer loop: NaN guard, early stopping, best-checkpoint restore."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from metarun.algo.protonet import ProtoNet
from metarun.config import ProtoNetConfig, TrainConfig
from metarun.errors import MetarunError
from metarun.logger import JsonlSink, Logger
from metarun.task import Episode, EpisodeSampler, fixed_episodes
from metarun.train.evaluate import EvalResult
from metarun.train.trainer import Checkpoints, Episodes, Trainer
from tests.cli_helpers import read_jsonl


class _NaNAfter(ProtoNet):
    """ProtoNet whose loss turns NaN at a given call: a diverging run."""

    def __init__(self, *args, bad_call: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.bad_call = 0, bad_call

    def meta_loss(self, episodes: Sequence[Episode]):
        self.calls += 1
        loss, metrics = super().meta_loss(episodes)
        return (loss * float("nan") if self.calls >= self.bad_call else loss), metrics


def _trainer(algo, task, tmp_path, **train) -> Trainer:
    cfg = TrainConfig(**({"steps": 6, "meta_batch_size": 1, "val_interval": 2, "lr": 1e-3} | train))
    sampler = EpisodeSampler(task.splits["train"], 3, 1, 2, seed=0)
    val = fixed_episodes(task.splits["valid"], 3, 1, 2, 6, 0, "valid")
    logger = Logger([JsonlSink(tmp_path / "metrics.jsonl")])
    return Trainer(
        algo, cfg, Episodes(sampler, val), logger, Checkpoints(tmp_path / "checkpoint.pt")
    )


def test_nan_loss_stops_with_a_clear_error_and_keeps_what_was_written(
    tiny_encoder, synthetic_task, tmp_path
):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = _NaNAfter(tiny_encoder, 3, ProtoNetConfig(), bad_call=4)
    trainer = _trainer(algo, synthetic_task, tmp_path)
    with pytest.raises(MetarunError, match=r"train/loss is nan at step 4: lower train\.lr"):
        trainer.fit()
    trainer.logger.close()
    steps = [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in m]
    assert steps == [1, 2, 3]
    assert (tmp_path / "checkpoint.pt").is_file()  # the step-2 best survives
    assert all(torch.isfinite(p).all() for p in algo.parameters())  # no NaN step was applied


def scripted_validation(monkeypatch, scores: list[float]) -> list[dict]:
    """Validation returns `scores` in turn; the returned list fills with the trainable weights
    each validation saw."""
    it, snapshots = iter(scores), []

    def fake_evaluate(algo, episodes, autocast=None, dist=None):
        snapshots.append(
            {n: p.detach().clone() for n, p in algo.named_parameters() if p.requires_grad}
        )
        acc = next(it)
        return EvalResult(np.full(3, acc), np.full(3, acc))

    monkeypatch.setattr("metarun.train.trainer.evaluate", fake_evaluate)
    return snapshots


def test_early_stopping_and_best_state_restored(
    tiny_encoder, synthetic_task, tmp_path, monkeypatch
):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0))
    trainer = _trainer(algo, synthetic_task, tmp_path, steps=20, patience=2)
    snapshots = scripted_validation(monkeypatch, [0.5, 0.9, 0.6, 0.7, 0.8])  # best: step 4
    fit = trainer.fit()
    assert fit.steps_done == 8 and fit.best_step == 4 and fit.best_val_acc == 0.9
    current = trainer.trainable_state()
    assert all(torch.equal(current[k], v) for k, v in snapshots[1].items())
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["val_acc"] == 0.9


def test_val_at_start_keeps_the_starting_weights_when_training_never_beats_them(
    tiny_encoder, synthetic_task, tmp_path, monkeypatch
):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0))
    start = {n: p.detach().clone() for n, p in algo.named_parameters() if p.requires_grad}
    trainer = _trainer(algo, synthetic_task, tmp_path, steps=4, val_at_start=True)
    scripted_validation(monkeypatch, [0.9, 0.5, 0.6])  # step 0, then steps 2 and 4
    fit = trainer.fit()
    assert fit.steps_done == 4 and fit.best_step == 0 and fit.best_val_acc == 0.9
    current = trainer.trainable_state()
    assert all(torch.equal(current[k], v) for k, v in start.items())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 0


def test_steps_zero_trains_nothing(tiny_encoder, synthetic_task, tmp_path):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0))
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    fit = _trainer(algo, synthetic_task, tmp_path, steps=0).fit()
    assert fit.steps_done == 0 and fit.best_step is None
    assert all(torch.equal(v, algo.state_dict()[k]) for k, v in before.items())
