"""Evaluation statistics and the frozen-feature cache."""

from __future__ import annotations

import numpy as np
import torch

from metarun.algo.protonet import ProtoNet
from metarun.config import ProtoNetConfig
from metarun.task import fixed_episodes
from metarun.train.evaluate import EvalResult, evaluate, macro_f1


def test_ci95_is_the_normal_interval_of_the_mean():
    accs = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    result = EvalResult(accs, accs)
    assert result.acc == 0.6
    assert np.isclose(result.ci95, 1.96 * np.std(accs, ddof=1) / np.sqrt(5))
    assert set(result.metrics("test")) == {"test/acc", "test/acc_ci95", "test/f1"}


def test_macro_f1_by_hand():
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> .5 ; class 1: tp2 fp1 fn0 -> .8 ; class 2: tp1 fp0 fn1 -> 2/3
    assert np.isclose(macro_f1(pred, true, 3), np.mean([0.5, 0.8, 2 / 3]))
    assert macro_f1(true, true, 3) == 1.0


class _CountingProtoNet(ProtoNet):
    feature_cache = False


def test_cached_and_uncached_evaluation_agree(tiny_encoder, synthetic_task):
    tiny_encoder.set_texts(synthetic_task.texts)
    episodes = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 8, 0, "test")
    cached = evaluate(
        ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0)), episodes
    )
    direct = evaluate(
        _CountingProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0)),
        episodes,
    )
    assert np.allclose(cached.accuracies, direct.accuracies)
    assert len(cached.accuracies) == 8


def test_evaluation_restores_training_mode_and_weights(tiny_encoder, synthetic_task):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0)).train()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    evaluate(algo, fixed_episodes(synthetic_task.splits["test"], 3, 1, 2, 3, 0, "test"))
    assert algo.training
    assert all(torch.equal(v, algo.state_dict()[k]) for k, v in before.items())


def test_frozen_evaluation_encodes_each_distinct_text_once(tiny_encoder, synthetic_task):
    tiny_encoder.set_texts(synthetic_task.texts)
    episodes = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 20, 0, "test")
    distinct = len(torch.unique(torch.cat([ep.text_ids() for ep in episodes])))
    encoded = []
    hook = tiny_encoder.model.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    evaluate(
        ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0)), episodes
    )
    hook.remove()
    assert sum(encoded) == distinct < 20 * 15  # 20 episodes of 15 texts share texts
