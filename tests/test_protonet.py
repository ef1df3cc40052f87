"""ProtoNet invariants and learning on separable synthetic episodes."""

from __future__ import annotations

import torch

from metarun.algo.protonet import ProtoNet, metric_logits, prototypes
from metarun.config import ProtoNetConfig
from metarun.task import EpisodeSampler, Examples, fixed_episodes


def test_prototypes_are_class_means():
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    protos = prototypes(emb, torch.tensor([0, 0, 1]), way=2)
    assert torch.allclose(protos, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_euclidean_logits_are_negative_squared_distances():
    q, p = torch.randn(4, 3), torch.randn(2, 3)
    expected = -((q[:, None] - p[None]) ** 2).sum(-1)
    assert torch.allclose(metric_logits(q, p, "euclidean"), expected, atol=1e-5)
    assert metric_logits(q, p, "cosine").abs().max() <= 1 + 1e-6


def test_query_equal_to_a_support_point_is_classified_as_its_class(tiny_encoder):
    tiny_encoder.set_texts(["alpha", "beta gamma", "delta"])
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0)).eval()
    support = Examples(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]))
    with torch.no_grad():
        logits = algo.adapt(support, 3)(Examples(torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2])))
    assert logits.argmax(-1).tolist() == [0, 1, 2]


def test_temperature_scales_logits_and_learns(tiny_encoder, synthetic_task):
    tiny_encoder.set_texts(synthetic_task.texts)
    ep = fixed_episodes(synthetic_task.splits["train"], 3, 2, 2, 1, 0, "train")[0]
    algo = ProtoNet(
        tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.5, learn_temperature=True)
    )
    loss, _ = algo.meta_loss([ep])
    loss.backward()
    assert algo.log_temperature.grad is not None and algo.log_temperature.grad != 0
    fixed = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.5))
    assert not any(p is fixed.log_temperature for p in fixed.parameters())


def test_meta_training_lowers_query_loss_and_beats_chance(tiny_encoder, synthetic_task):
    torch.manual_seed(0)
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="euclidean", temperature=1.0))
    held_out = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 12, 5, "valid")

    def held_out_loss() -> tuple[float, float]:
        with torch.no_grad():
            loss, metrics = algo.meta_loss(held_out)
        return float(loss), metrics["acc"]

    before, _ = held_out_loss()
    sampler = EpisodeSampler(synthetic_task.splits["train"], 3, 2, 3, seed=0)
    opt = torch.optim.Adam(algo.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = algo.meta_loss([sampler.sample() for _ in range(2)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, acc = held_out_loss()
    assert after < 0.7 * before
    assert acc > 0.6  # chance is 1/3
