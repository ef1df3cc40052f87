"""Invariants of the gradient-based family on a tiny dropout-free BERT."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from metarun.algo import build_algorithm
from metarun.backbone import load_backbone
from metarun.errors import MetarunError
from metarun.task import EpisodeSampler, fixed_episodes
from metarun.train.evaluate import evaluate

from .grad_helpers import check_against_finite_differences, meta_grads


@pytest.fixture
def make(compose_cfg, synthetic_task):
    """make(*algo overrides, dtype=...) -> a fresh algorithm; same seed, same initial weights."""

    def _make(*overrides: str, dtype=torch.float32, checkpointing: bool = False):
        cfg = compose_cfg("backbone=tiny", *overrides)
        backbone = OmegaConf.to_object(cfg).backbone
        backbone.gradient_checkpointing = checkpointing
        backbone.arch = {**backbone.arch, "hidden_dropout_prob": 0.0,
                         "attention_probs_dropout_prob": 0.0}  # fmt: skip
        torch.manual_seed(0)
        encoder = load_backbone(backbone)
        encoder.set_texts(synthetic_task.texts)
        return build_algorithm(cfg.algo, encoder, 3).to(dtype).train()

    return _make


@pytest.fixture
def episodes(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 2, 0, "train")


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), name


def test_second_order_meta_gradient_matches_finite_differences(make, episodes):
    algo = make("algo=maml", "algo.adapt=top_k", "algo.top_k=1", "algo.inner_steps=2",
                "algo.inner_lr=0.5", dtype=torch.float64)  # fmt: skip
    grads = check_against_finite_differences(algo, episodes, eps=1e-5)
    first = make("algo=fomaml", "algo.adapt=top_k", "algo.top_k=1", "algo.inner_steps=2",
                 "algo.inner_lr=0.5", dtype=torch.float64)  # fmt: skip
    fo = meta_grads(first, episodes)
    assert any(not torch.allclose(fo[n], grads[n]) for n in grads)  # second order is not free


@pytest.mark.parametrize("algo_name", ["maml", "fomaml"])
def test_zero_inner_lr_gives_the_plain_gradient(make, episodes, algo_name):
    algo = make(f"algo={algo_name}", "algo.inner_steps=1", "algo.inner_lr=0.0")
    got = meta_grads(algo, episodes)
    # The plain gradient: query loss of the initial head (prototypes) and initial encoder.
    algo.zero_grad()
    losses = []
    for ep in episodes:
        protos_w, protos_b = algo.inner.head.init_weights(
            algo.encoder(ep.support.ids), ep.support.labels, ep.way, algo.inner.lrs
        )
        logits = F.linear(algo.encoder(ep.query.ids), protos_w, protos_b)
        losses.append(F.cross_entropy(logits, ep.query.labels))
    torch.stack(losses).mean().backward()
    plain = {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}
    assert_same(got, plain, atol=1e-6)


def test_anil_equals_maml_restricted_to_the_head(make, episodes):
    # Support and query encoded once per task, in one forward; against re-encoding at every
    # inner step (float64: the batches differ, so float32 rounding would differ too).
    anil = make("algo=anil", dtype=torch.float64)
    plain = make("algo=anil", "algo.reuse_features=false", dtype=torch.float64)
    assert anil.feature_cache and not plain.feature_cache
    grads = meta_grads(anil, episodes)
    assert any(n.startswith("encoder.model.") for n in grads)  # the body still learns
    assert_same(grads, meta_grads(plain, episodes), atol=1e-10)


def test_reptile_moves_weights_towards_the_adapted_ones_by_the_step_fraction(make, episodes):
    algo = make("algo=reptile", "algo.inner_steps=3", "algo.inner_lr=0.1")
    (episode,) = episodes[:1]
    before = {n: p.detach().clone() for n, p in algo.named_parameters() if p.requires_grad}
    adapted = algo.inner.run(algo.encoder, episode.support, 3, 3, track=False, create_graph=False)
    phi = {n.removeprefix("model."): v for n, v in adapted.params.items() if n.startswith("model.")}
    fraction = 0.25
    opt = torch.optim.SGD(algo.parameters(), lr=fraction)
    opt.zero_grad()
    algo.meta_loss([episode])[0].backward()
    opt.step()
    for name, theta in before.items():
        expected = theta + fraction * (phi[name.removeprefix("encoder.model.")] - theta)
        assert torch.allclose(dict(algo.named_parameters())[name], expected, atol=1e-6), name
    assert any(not torch.equal(before[n], p) for n, p in algo.named_parameters() if n in before)


@pytest.mark.parametrize(("adapt", "lr"), [("all", 0.05), ("head", 0.5), ("bias", 0.5),
                                           ("lora", 0.5), ("top_k", 0.1)])  # fmt: skip
def test_an_inner_step_lowers_the_support_loss(make, episodes, adapt, lr):
    algo = make("algo=maml", f"algo.adapt={adapt}", "algo.head_init=zeros", f"algo.inner_lr={lr}")
    ep = episodes[0]

    def support_loss_after(steps: int) -> float:
        adapted = algo.inner.run(algo.encoder, ep.support, 3, steps, track=False,
                                 create_graph=False)  # fmt: skip
        with torch.no_grad():
            return float(F.cross_entropy(adapted.predict(ep.support), ep.support.labels))

    assert support_loss_after(0) == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-5)
    one, three = support_loss_after(1), support_loss_after(3)
    assert three < one < support_loss_after(0)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "reptile"])
def test_outer_steps_lower_the_query_loss(make, synthetic_task, name):
    algo = make(f"algo={name}", "algo.inner_steps=2", "algo.eval_inner_steps=2")
    held_out = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 8, 3, "valid")
    sampler = EpisodeSampler(synthetic_task.splits["train"], 3, 2, 3, seed=0)
    lr = 0.5 if name == "reptile" else 3e-3
    opt = torch.optim.SGD(algo.parameters(), lr=lr) if name == "reptile" else torch.optim.Adam(
        algo.parameters(), lr=lr)  # fmt: skip

    def query_loss() -> float:
        algo.eval()
        total = 0.0
        with torch.no_grad():  # as in evaluation: the inner loop enables gradients itself
            for ep in held_out:
                logits = algo.adapt(ep.support, 3)(ep.query)
                total += float(F.cross_entropy(logits, ep.query.labels))
        algo.train()
        return total / len(held_out)

    before = query_loss()
    for _ in range(15):
        opt.zero_grad()
        algo.meta_loss([sampler.sample(), sampler.sample()])[0].backward()
        opt.step()
    assert query_loss() < 0.9 * before


def test_func_and_higher_backends_agree(make, episodes):
    for extra in ([], ["algo.first_order=true"], ["algo.adapt=head"]):
        func = meta_grads(make("algo=maml", "algo.inner_steps=2", *extra), episodes)
        high = meta_grads(make("algo=maml", "algo.inner_steps=2", "algo.backend=higher", *extra),
                          episodes)  # fmt: skip
        assert_same(func, high, atol=1e-5)


def test_learned_inner_rates_and_inner_adam(make, episodes):
    algo = make("algo=maml", "algo.learn_inner_lr=true", "algo.inner_optimizer=adam",
                "algo.adapt=top_k", "algo.top_k=1", "algo.inner_steps=2")  # fmt: skip
    grads = meta_grads(algo, episodes)
    assert grads["inner.lrs"].shape == (2, len(algo.inner.names) + 2)
    assert grads["inner.lrs"].abs().sum() > 0


def test_evaluation_adapts_without_changing_the_model(make, synthetic_task):
    algo = make("algo=maml", "algo.eval_inner_steps=3").eval()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    result = evaluate(algo, fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 4, 0, "test"))
    assert len(result.accuracies) == 4
    assert all(torch.equal(v, algo.state_dict()[k]) for k, v in before.items())


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # touching every object trips deprecated-alias warnings
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_no_memory_growth_across_meta_steps(make, synthetic_task, name):
    algo = make(f"algo={name}", "algo.inner_steps=2")
    sampler = EpisodeSampler(synthetic_task.splits["train"], 3, 2, 3, seed=0)
    opt = torch.optim.Adam(algo.parameters(), lr=1e-4)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            algo.meta_loss([sampler.sample()])[0].backward()
            opt.step()

    steps(5)
    after_5 = _live_tensors()
    steps(45)
    assert _live_tensors() <= after_5 + 5  # nothing accumulates per step (graphs, states)


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_activation_checkpointing_keeps_meta_gradients(make, episodes, name):
    """Recomputation must see the adapted weights: HF's own checkpointing would not."""
    plain = meta_grads(make(f"algo={name}", "algo.inner_lr=0.1"), episodes)
    ckpt = meta_grads(make(f"algo={name}", "algo.inner_lr=0.1", checkpointing=True), episodes)
    # Checkpointed calls always use the math attention kernel; first order otherwise may not.
    assert_same(plain, ckpt, atol=1e-3)


def test_episode_vocabulary_inner_loop_equals_the_full_table(make, episodes):
    """Adapting only the embedding rows of an episode's tokens is exact: the same meta-gradient
    and the same adapted weights as carrying the whole table through the inner loop."""
    cut = make("algo=maml", "algo.inner_steps=2", "algo.inner_lr=0.5", dtype=torch.float64)
    assert cut.inner.table == "model.embeddings.word_embeddings.weight"
    full = make("algo=maml", "algo.inner_steps=2", "algo.inner_lr=0.5", dtype=torch.float64)
    full.inner.table = None
    assert_same(meta_grads(cut, episodes), meta_grads(full, episodes), atol=1e-10)
    support = episodes[0].support
    a = cut.inner.run(cut.encoder, support, 3, 2, track=False, create_graph=False).params
    b = full.inner.run(full.encoder, support, 3, 2, track=False, create_graph=False).params
    name = "model.embeddings.word_embeddings.weight"
    assert a[name].shape == b[name].shape and torch.allclose(a[name], b[name], atol=1e-10)
    moved = (a[name] != cut.encoder.model.get_parameter(name[6:])).any(-1)
    assert 0 < int(moved.sum()) <= len(cut.encoder.local_vocab(support.ids))


def test_inner_gradient_treats_the_prototype_head_as_its_own_variable(make, episodes):
    """With head_init=proto the head is computed from the encoder; the inner step's encoder
    gradient is the partial one (head held fixed), the same at step 0 as at later steps."""
    algo = make("algo=maml", "algo.adapt=bias", "algo.inner_steps=1", "algo.inner_lr=0.1",
                dtype=torch.float64)  # fmt: skip
    support = episodes[0].support
    adapted = algo.inner.run(algo.encoder, support, 3, 1, track=True, create_graph=False)
    inner = algo.inner
    enc = algo.encoder
    params = {f"model.{n}": enc.model.get_parameter(n).detach().clone().requires_grad_()
              for n in inner.names}  # fmt: skip
    with torch.no_grad():
        weight, bias = inner.head.init_weights(enc(support.ids), support.labels, 3, inner.lrs)
    params |= {"head.weight": weight.requires_grad_(), "head.bias": bias.requires_grad_()}
    loss = F.cross_entropy(inner.head.scores(enc, support, params), support.labels)
    found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = dict(zip(params, found, strict=True))
    for name, value in params.items():
        if grads[name] is None:  # the pooler: unused by mean pooling, left as it is
            continue
        expected = value.detach() - 0.1 * grads[name]
        assert torch.allclose(adapted.params[name].detach(), expected, atol=1e-10), name


CHECKPOINTED = {
    "all": ["algo.head_init=learned"],
    "top_k": ["algo.adapt=top_k", "algo.top_k=1"],  # lower layers train but do not adapt
    "lora": ["algo.adapt=lora"],
    "adam-learned-lr": ["algo.inner_optimizer=adam", "algo.learn_inner_lr=true"],
    "packed": ["backbone.packing=always"],
}


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_checkpointed_inner_steps_keep_the_second_order_meta_gradient(make, episodes, case):
    """Rebuilding each inner step's graph in the outer backward changes no meta-gradient."""
    overrides = ["algo=maml", "algo.inner_steps=3", "algo.inner_lr=0.3", *CHECKPOINTED[case]]
    plain = make(*overrides, dtype=torch.float64)
    ckpt = make(*overrides, "algo.checkpoint_inner_steps=true", dtype=torch.float64)
    grads = meta_grads(plain, episodes)
    assert any(n.startswith("encoder.model.") for n in grads)
    assert_same(grads, meta_grads(ckpt, episodes), atol=1e-10)


def test_checkpointed_inner_steps_replay_dropout_and_keep_less(compose_cfg, synthetic_task):
    """With dropout on, the replayed step draws the same masks (equal meta-gradients); what
    autograd holds then grows with the inner steps by the adapted weights alone, not by every
    step's activations."""
    eps = fixed_episodes(synthetic_task.splits["train"], 3, 8, 4, 1, 0, "train")

    def run(checkpoint: bool, steps: int) -> tuple[dict, int]:
        cfg = compose_cfg("backbone=tiny", "algo=maml", f"algo.inner_steps={steps}")
        torch.manual_seed(0)
        encoder = load_backbone(OmegaConf.to_object(cfg).backbone)
        encoder.set_texts(synthetic_task.texts)
        cfg.algo.checkpoint_inner_steps = checkpoint
        algo = build_algorithm(cfg.algo, encoder, 3).train()
        torch.manual_seed(1)  # the same dropout draws in both runs
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = algo.meta_loss(eps[:1])
        held = sum(e.self_cpu_memory_usage for e in prof.events())  # allocated, not yet freed
        loss.backward()
        grads = {n: p.grad for n, p in algo.named_parameters() if p.grad is not None}
        return grads, held

    plain, plain_bytes = run(False, 6)
    ckpt, ckpt_bytes = run(True, 6)
    assert_same(plain, ckpt, atol=1e-6)
    plain_growth = plain_bytes - run(False, 2)[1]
    ckpt_growth = ckpt_bytes - run(True, 2)[1]
    assert ckpt_growth < 0.3 * plain_growth


def test_packed_texts_give_the_padded_second_order_meta_gradient(make, episodes):
    padded = meta_grads(make("algo=maml", "algo.inner_lr=0.3", dtype=torch.float64), episodes)
    packed = make("algo=maml", "algo.inner_lr=0.3", "backbone.packing=always", dtype=torch.float64)
    assert packed.encoder.table.packs()
    assert_same(padded, meta_grads(packed, episodes), atol=1e-10)


def test_checkpointed_inner_steps_need_second_order(make):
    with pytest.raises(MetarunError, match="checkpoint_inner_steps"):
        make("algo=fomaml", "algo.checkpoint_inner_steps=true")
