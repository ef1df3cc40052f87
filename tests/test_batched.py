"""Episodes side by side in one inner loop (algo/batched.py, hardware.episode_batch): every
per-episode number equals adapting the episodes one at a time."""

from __future__ import annotations

import pytest
import torch

from metarun.algo.batched import episode_slice, is_factor, side_by_side, token_episodes
from metarun.errors import MetarunError
from metarun.task import fixed_episodes
from metarun.train.evaluate import evaluate

from .conftest import seeded_algorithm
from .grad_helpers import meta_grads

STEPS = ["algo.inner_steps=2", "algo.eval_inner_steps=3", "algo.inner_lr=0.5"]
CASES = [  # LoRA under the verbalizer head, as MAML, FOMAML and fine-tuning adapt it
    ("tiny-llama", ["algo=maml", "algo.head=verbalizer"]),
    ("tiny-llama", ["algo=fomaml", "algo.head=verbalizer", "algo.inner_optimizer=adam"]),
    ("tiny-llama", ["algo=maml", "algo.head=verbalizer", "algo.adapt_layers=1",
                    "algo.learn_inner_lr=true"]),  # the bottom block runs once per forward
    ("tiny-gpt2", ["algo=fomaml", "algo.head=verbalizer"]),
]  # fmt: skip


def build(compose_cfg, task, backbone: str, *overrides: str):
    """A float64 algorithm whose LoRA B factors start away from zero (peft starts them at zero,
    which would leave the A factors' first gradient zero and test less)."""
    algo = seeded_algorithm(compose_cfg, task, backbone, *overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return algo.to(torch.float64)


@pytest.fixture
def episodes(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 4, 0, "train")


@pytest.mark.parametrize(("backbone", "overrides"), CASES, ids=lambda c: str(c))
def test_side_by_side_training_gives_each_episodes_loss_and_meta_gradient(
    compose_cfg, synthetic_task, episodes, backbone, overrides, float64_rmsnorm
):
    algo = build(compose_cfg, synthetic_task, backbone, *overrides, *STEPS).train()
    assert algo.batches_episodes
    ref, ref_metrics = algo.meta_loss(episodes)
    want = meta_grads(algo, episodes)
    algo.episode_batch = 3  # blocks of 3 and 1
    loss, metrics = algo.meta_loss(episodes)
    got = meta_grads(algo, episodes)
    assert torch.allclose(loss, ref, rtol=1e-10, atol=0) and metrics["acc"] == ref_metrics["acc"]
    assert got.keys() == want.keys() and any("lora_A" in n for n in got)
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-8, atol=1e-12), name


@pytest.mark.parametrize(("backbone", "overrides"), [
    ("tiny-llama", [*CASES[1][1], *STEPS]),
    ("tiny-llama", ["algo=finetune", "algo.head=verbalizer", "algo.eval_steps=3",
                    "algo.eval_lr=0.5"]),
], ids=lambda c: str(c))  # fmt: skip
def test_side_by_side_evaluation_gives_each_episodes_predictions(
    compose_cfg, synthetic_task, episodes, backbone, overrides, float64_rmsnorm
):
    algo = build(compose_cfg, synthetic_task, backbone, *overrides).eval()
    assert algo.batches_episodes
    with torch.no_grad():
        alone = [algo.adapt(ep.support, ep.way)(ep.query) for ep in episodes]
        adapted = algo.inner.run_many(algo.encoder, [ep.support for ep in episodes], 3,
                                      3, track=False, create_graph=False)  # fmt: skip
        together = adapted.predict([ep.query for ep in episodes])
        for e, ep in enumerate(episodes):  # the factors themselves are each episode's own
            own = algo.inner.run(algo.encoder, ep.support, 3, 3, track=False, create_graph=False)
            mine = episode_slice(adapted.params, len(episodes), e)
            for name, value in mine.items():
                assert torch.allclose(value, own.params[name], rtol=1e-9, atol=1e-12), name
            assert adapted.support_losses[e] == pytest.approx(own.support_loss, rel=1e-9)
    for a, b in zip(alone, together, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
    one = evaluate(algo, episodes)
    algo.episode_batch = 3
    assert (evaluate(algo, episodes).accuracies == one.accuracies).all()


def test_what_cannot_go_side_by_side_adapts_one_at_a_time(compose_cfg, synthetic_task, episodes):
    """Full weights, the linear head and checkpointed steps keep the one-at-a-time path, with
    the same numbers whatever hardware.episode_batch says."""
    for overrides in (
        ["algo=maml", "algo.head=verbalizer", "algo.adapt=top_k", "algo.top_k=1"],
        ["algo=maml", "algo.adapt=lora"],
        ["algo=maml", "algo.head=verbalizer", "algo.checkpoint_inner_steps=true"],
    ):
        algo = build(compose_cfg, synthetic_task, "tiny-llama", *overrides, *STEPS).train()
        assert not algo.batches_episodes, overrides
        ref, _ = algo.meta_loss(episodes)
        algo.episode_batch = 4
        assert torch.equal(algo.meta_loss(episodes)[0], ref), overrides


def test_factors_side_by_side_and_back():
    a, b = torch.randn(2, 5), torch.randn(7, 2)
    params = {"x.lora_A.default.weight": a, "x.lora_B.default.weight": b}
    both = side_by_side(params, 3)
    assert both["x.lora_A.default.weight"].shape == (6, 5)
    assert both["x.lora_B.default.weight"].shape == (7, 6)
    for e in range(3):
        for name, value in episode_slice(both, 3, e).items():
            assert torch.equal(value, params[name])
    with pytest.raises(MetarunError, match="not a LoRA factor"):
        side_by_side({"x.weight": a}, 2)
    assert is_factor("x.lora_B.default.weight")
    assert not is_factor("x.lora_A.default.bias") and not is_factor("x.lora_A.lora_B.weight")


def test_a_lora_layer_outside_the_token_layout_is_refused(compose_cfg, synthetic_task):
    """A LoRA layer fed something other than the batched tokens (an LM head over picked
    positions, say) cannot tell whose factors apply: one clear error, not silent mixing."""
    algo = build(compose_cfg, synthetic_task, "tiny-llama", "algo=maml", "algo.head=verbalizer")
    layer = next(m for n, m in algo.encoder.model.named_modules() if n.endswith("lora_A.default"))
    episode = torch.tensor([[0, 1, -1]])
    with token_episodes(algo.encoder.model, episode, 2):
        out = layer(torch.ones(1, 3, layer.in_features, dtype=torch.float64))
        width = out.shape[-1] // 2
        assert (out[0, 0, width:] == 0).all() and (out[0, 1, :width] == 0).all()
        assert (out[0, 2] == 0).all() and (out[0, 0, :width] != 0).any()
        with pytest.raises(MetarunError, match="episode_batch=1"):
            layer(torch.ones(4, layer.in_features, dtype=torch.float64))
    assert (layer(torch.ones(1, 3, layer.in_features, dtype=torch.float64)) != 0).all()


def test_episode_batch_below_one_is_refused_by_name(compose_cfg):
    from metarun.checks import check_config

    check_config(compose_cfg("hardware.episode_batch=8"))
    with pytest.raises(MetarunError, match=r"hardware.episode_batch=0 is out of range: it must"):
        check_config(compose_cfg("hardware.episode_batch=0"))
