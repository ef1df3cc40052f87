"""Adapt the top, compute the bottom once (backbone/bottom.py): the blocks below the lowest
adapted one run once per episode, and every number equals the path that runs them each step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from metarun.algo import build_algorithm
from metarun.backbone import bottom, load_backbone, transformer_layers
from metarun.backbone.bottom import replayable
from metarun.task import fixed_episodes
from metarun.train.evaluate import evaluate

from .grad_helpers import meta_grads

NO_DROPOUT = {"tiny": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "tiny-gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
              "tiny-llama": {}}  # fmt: skip


@pytest.fixture
def make(compose_cfg, synthetic_task):
    """make(backbone, *overrides, cached=...) -> a fresh float64 algorithm (seed 0), dropout-free,
    and a counter of the forwards its bottom block runs."""

    def _make(backbone: str, *overrides: str, cached: bool = True, dropout: bool = False):
        cfg = compose_cfg(f"backbone={backbone}", *overrides,
                          f"++algo.cache_frozen_layers={str(cached).lower()}")  # fmt: skip
        spec = OmegaConf.to_object(cfg).backbone
        if not dropout:
            spec.arch = {**spec.arch, **NO_DROPOUT[backbone]}
        torch.manual_seed(0)
        encoder = load_backbone(spec)
        encoder.set_texts(synthetic_task.texts)
        algo = build_algorithm(cfg.algo, encoder, 3)
        algo.prepare(synthetic_task)
        calls = [0]
        first = transformer_layers(encoder.model)[0]
        first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return algo.to(torch.float64).train(), calls

    return _make


@pytest.fixture
def episodes(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 2, 0, "train")


CASES = [  # (backbone, overrides): top blocks adapted by full weights, LoRA or biases
    ("tiny", ["algo=maml", "algo.adapt=top_k", "algo.top_k=1"]),
    ("tiny", ["algo=maml", "algo.adapt=top_k", "algo.top_k=1", "backbone.packing=always"]),
    ("tiny", ["algo=fomaml", "algo.adapt=lora", "algo.adapt_layers=1"]),
    ("tiny-gpt2", ["algo=maml", "algo.adapt=bias", "algo.adapt_layers=1"]),
    ("tiny-llama", ["algo=maml", "algo.adapt=lora", "algo.adapt_layers=1",
                    "backbone.packing=always"]),
    ("tiny-llama", ["algo=maml", "algo.head=verbalizer", "algo.adapt_layers=1"]),  # trees
    ("tiny-llama", ["algo=fomaml", "algo.head=verbalizer", "algo.adapt=top_k",
                    "algo.top_k=1"]),
]  # fmt: skip


@pytest.mark.parametrize(("backbone", "overrides"), CASES, ids=lambda c: str(c))
def test_cached_bottom_gives_the_same_loss_meta_gradients_and_predictions(
    make, episodes, backbone, overrides, float64_rmsnorm
):
    steps = ["algo.inner_steps=3", "algo.eval_inner_steps=3", "algo.inner_lr=0.3"]
    cached, calls = make(backbone, *overrides, *steps)
    plain, plain_calls = make(backbone, *overrides, *steps, cached=False)
    assert cached.inner.split > 0 and plain.inner.split == 0
    loss, _ = cached.meta_loss(episodes)
    ref, _ = plain.meta_loss(episodes)
    assert torch.allclose(loss, ref, rtol=0, atol=1e-12), float(loss - ref)
    got, want = meta_grads(cached, episodes), meta_grads(plain, episodes)
    assert got.keys() == want.keys() and got
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-12), name
    calls[0] = plain_calls[0] = 0
    with torch.no_grad():
        a = cached.eval().adapt(episodes[0].support, 3)(episodes[0].query)
        b = plain.eval().adapt(episodes[0].support, 3)(episodes[0].query)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # The bottom block ran for the support set once (not once per step) and for the queries.
    assert calls[0] < plain_calls[0]
    assert evaluate(cached, episodes).acc == evaluate(plain, episodes).acc


# (backbone, overrides, whether the replay attends eagerly): GPT-2's blocks take their mask by
# position, not by name, so they keep SDPA
SHORT_ROWS = [("tiny-llama", ["algo.adapt=lora", "backbone.packing=always"], True),
              ("tiny-llama", ["algo.head=verbalizer"], True),
              ("tiny-gpt2", ["algo.head=verbalizer"], False)]  # fmt: skip


@pytest.mark.parametrize(("backbone", "overrides", "eager"), SHORT_ROWS,
                         ids=["packed", "trees", "gpt2"])  # fmt: skip
def test_short_rows_replay_eager_attention_with_sdpa_numbers(
    make, episodes, backbone, overrides, eager, monkeypatch
):
    """On a CPU the replayed blocks of rows up to `EAGER_WIDTH` attend by plain matmuls (the
    model's eager attention, faster there than the fused kernel): float32 numbers equal SDPA's
    path, and the model's own attention setting is left as it was."""
    steps = ["algo=maml", "algo.adapt_layers=1", "algo.inner_steps=3", "algo.eval_inner_steps=3"]
    cached, _ = make(backbone, *steps, *overrides)
    plain, _ = make(backbone, *steps, *overrides, cached=False)
    cached, plain = cached.float(), plain.float()
    config = cached.encoder.model.config
    seen = []
    top = transformer_layers(cached.encoder.model)[-1]
    top.register_forward_pre_hook(lambda *_: seen.append(config._attn_implementation))
    loss, ref = cached.meta_loss(episodes)[0], plain.meta_loss(episodes)[0]
    assert ("eager" in seen) == eager and config._attn_implementation == "sdpa"
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    got, want = meta_grads(cached, episodes), meta_grads(plain, episodes)
    assert got.keys() == want.keys() and got
    for name in got:  # float32: relative to the gradient's size
        error = float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12))
        assert error < 1e-4, (name, error)
    with torch.no_grad():
        a = cached.eval().adapt(episodes[0].support, 3)(episodes[0].query)
        b = plain.eval().adapt(episodes[0].support, 3)(episodes[0].query)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(bottom, "EAGER_WIDTH", 0)
    seen.clear()
    cached.train().meta_loss(episodes)
    assert seen and "eager" not in seen


def test_dropout_in_training_runs_the_bottom_every_step(make, episodes):
    """Dropout draws a new mask per forward: reusing one would change training, so a model
    with active dropout below the split is not cached while it trains (it is in evaluation)."""
    algo, calls = make("tiny", "algo=maml", "algo.adapt=top_k", "algo.top_k=1",
                       "algo.inner_steps=3", dropout=True)  # fmt: skip
    algo.meta_loss(episodes[:1])
    training = calls[0]
    calls[0] = 0
    with torch.no_grad():
        algo.eval().adapt(episodes[0].support, 3)(episodes[0].query)
    assert training >= 4 and calls[0] < training


def test_nothing_is_cached_when_a_bottom_tensor_adapts(make):
    algo, _ = make("tiny", "algo=maml", "algo.adapt=bias")  # every block's biases
    assert algo.inner.split == 0
    lora, _ = make("tiny-llama", "algo=maml", "algo.adapt=lora", "algo.adapt_layers=1")
    layers = len(transformer_layers(lora.encoder.model))
    assert lora.inner.split == layers - 1
    assert all(f"layers.{layers - 1}." in n for n in lora.inner.names)


def test_only_architectures_whose_blocks_share_their_arguments_are_replayed(
    make, episodes, monkeypatch
):
    """A model whose blocks take different masks (sliding-window layers, per-layer configs) or
    an architecture not known to pass every block the same arguments runs every block."""

    def model(kind: str, **config):
        return SimpleNamespace(config=SimpleNamespace(model_type=kind, **config))

    assert replayable(model("llama")) and replayable(model("bert"))
    assert not replayable(model("llama", layer_types=["sliding_attention", "full_attention"]))
    assert not replayable(model("gemma2"))
    algo, calls = make("tiny-llama", "algo=maml", "algo.adapt=top_k", "algo.top_k=1",
                       "algo.inner_steps=3")  # fmt: skip
    with torch.no_grad():
        algo.eval().adapt(episodes[0].support, 3)(episodes[0].query)
    cached, calls[0] = calls[0], 0
    monkeypatch.setattr("metarun.backbone.encoder.replayable", lambda model: False)
    with torch.no_grad():
        algo.adapt(episodes[0].support, 3)(episodes[0].query)
    assert calls[0] > cached
