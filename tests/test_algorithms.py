"""Metric, closed-form, model-based and baseline algorithms: each learns on separable synthetic
episodes, and each has a test of what makes it what it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarun.algo.logreg import fit_logistic
from metarun.algo.ridge import ridge_solve
from metarun.errors import MetarunError
from metarun.task import EpisodeSampler, Examples, fixed_episodes
from metarun.train.evaluate import evaluate

from .conftest import seeded_algorithm


@pytest.fixture
def make(compose_cfg, synthetic_task):
    """make(algo, *overrides) -> (algorithm prepared on the synthetic task, its TaskData)."""

    def _make(algo: str, *overrides: str, backbone: str = "tiny"):
        return seeded_algorithm(compose_cfg, synthetic_task, backbone, f"algo={algo}", *overrides)

    return _make


@pytest.fixture
def held_out(synthetic_task):
    """Episodes of the meta-train classes drawn with another seed than training's."""
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 12, 5, "valid")


def meta_train(algo, synthetic_task, steps: int, lr: float = 3e-3) -> None:
    groups = [dict(g, lr=g.get("lr", lr)) for g in algo.param_groups()]
    opt = torch.optim.Adam(groups)
    sampler = EpisodeSampler(synthetic_task.splits["train"], 3, 2, 3, seed=0)
    algo.train()
    for _ in range(steps):
        loss, _ = algo.meta_loss([sampler.sample() for _ in range(2)])
        opt.zero_grad()
        loss.backward()
        opt.step()


def held_out_loss(algo, episodes) -> float:
    algo.eval()
    with torch.no_grad():
        return float(algo.meta_loss(episodes)[0])


LEARNERS = [("relationnet", 80), ("matchingnet", 30), ("ridge", 30), ("hypernet", 30),
            ("hypernet", 30, "algo.generate_lora=true"), ("finetune", 30), ("zeroshot", 30),
            ("metaicl", 100), ("protonet", 30, "backbone=tiny-llama"),
            ("maml", 40, "backbone=tiny-llama", "algo.head=verbalizer", "algo.inner_steps=1",
             "algo.eval_inner_steps=1")]  # fmt: skip


@pytest.mark.parametrize("case", LEARNERS, ids=lambda c: "-".join(map(str, c[:1] + c[2:4])))
def test_meta_training_lowers_held_out_loss_and_beats_chance(make, synthetic_task, held_out, case):
    algo_name, steps, *overrides = case
    backbone = "tiny-gpt2" if "icl" in algo_name else "tiny"
    backbone = next((o.split("=")[1] for o in overrides if o.startswith("backbone=")), backbone)
    overrides = [o for o in overrides if not o.startswith("backbone=")]
    algo = make(algo_name, *overrides, backbone=backbone)
    before = held_out_loss(algo, held_out)
    meta_train(algo, synthetic_task, steps)
    after = held_out_loss(algo, held_out)
    assert after < 0.7 * before
    assert evaluate(algo, held_out).acc > 0.6  # chance is 1/3


def test_ridge_head_matches_numpy_closed_form():
    rng = np.random.default_rng(0)
    for n, d in ((6, 10), (12, 4)):  # the Woodbury (n < d) and the primal form
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
        expected = np.linalg.solve(x.T @ x + 0.7 * np.eye(d), x.T @ y)
        lam = torch.tensor(0.7, dtype=torch.float64)
        got = ridge_solve(torch.from_numpy(x), torch.from_numpy(y), lam)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_ridge_gradient_reaches_encoder_and_penalty(make, held_out):
    algo = make("ridge")
    loss, _ = algo.meta_loss(held_out[:2])
    loss.backward()
    assert algo.log_lambda.grad is not None and algo.log_lambda.grad != 0
    grads = [p.grad for p in algo.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("lora", [False, True], ids=["head", "head+lora"])
def test_hypernetwork_weights_depend_on_the_support_set(make, held_out, lora):
    algo = make("hypernet", f"algo.generate_lora={str(lora).lower()}")
    with torch.no_grad():  # move the writers off their ProtoNet-equivalent start
        for module in (algo.head_writer, algo.lora_writer):
            for p in module.parameters() if module is not None else []:
                p.add_(0.05 * torch.randn_like(p))
    first, second = (algo.generate(ep.support, ep.way) for ep in held_out[:2])
    assert first.keys() == second.keys()
    assert ("head.weight" in first) and (len(first) > 2) == lora
    for name in first:
        assert not torch.allclose(first[name], second[name]), name
    # The hypernetwork's own parameters are what trains; the LoRA slots are only written.
    encoder = algo.encoder.named_parameters()
    assert not [n for n, p in encoder if "lora_" in n and p.requires_grad]


def test_zeroshot_uses_no_support_example(make, held_out):
    algo = make("zeroshot").eval()
    ep = held_out[0]
    other = Examples(ep.query.ids, ep.query.labels, ep.support.classes)  # other texts, same names
    empty = Examples(ep.support.ids[:0], ep.support.labels[:0], ep.support.classes)
    with torch.no_grad():
        logits = [algo.adapt(s, ep.way)(ep.query) for s in (ep.support, other, empty)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    with pytest.raises(MetarunError, match="class names"):
        algo.adapt(Examples(ep.support.ids, ep.support.labels), ep.way)


def test_frozen_baseline_trains_nothing_and_solves_each_regression(make, held_out):
    algo = make("frozen")
    assert algo.param_groups() == []
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2] * 3)
    weight, bias = fit_logistic(x, y, 3, c=2.0, max_iter=200)
    weight.requires_grad_(), bias.requires_grad_()
    objective = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="sum")
    objective = objective + (weight**2).sum() / (2 * 2.0)
    grads = torch.autograd.grad(objective, [weight, bias])
    assert max(float(g.abs().max()) for g in grads) < 1e-4  # the optimum: zero gradient
    assert evaluate(algo, held_out).acc > 0.6


def test_finetune_classifies_all_meta_train_classes_and_fits_fresh_heads(make, synthetic_task):
    algo = make("finetune", "algo.eval_steps=0")
    assert algo.objective.classifier.out_features == len(synthetic_task.splits["train"])
    ep = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 1, 0, "test")[0]
    with torch.no_grad():  # no fitting steps: a zero head, every class equally likely
        assert torch.all(algo.eval().adapt(ep.support, 3)(ep.query) == 0)
    fitted = make("finetune", "algo.eval_steps=20").eval()
    with torch.no_grad():
        logits = fitted.adapt(ep.support, 3)(ep.support)
    assert (logits.argmax(-1) == ep.support.labels).float().mean() == 1.0


def test_relation_scores_and_matching_probabilities(make, held_out):
    ep = held_out[0]
    relation = make("relationnet").eval()
    with torch.no_grad():
        scores = relation.adapt(ep.support, 3)(ep.query)
    assert scores.shape == (len(ep.query), 3)
    matching = make("matchingnet", "algo.temperature=0.001", "algo.learn_temperature=false")
    with torch.no_grad():
        logp = matching.eval().adapt(ep.support, 3)(ep.support)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(ep.support)), atol=1e-5)
    assert torch.equal(logp.argmax(-1), ep.support.labels)  # a support text attends to itself


@pytest.mark.parametrize("algo", ["icl", "metaicl", "prompt"])
def test_prompt_algorithms_refuse_an_encoder(make, algo):
    with pytest.raises(MetarunError, match="a decoder backbone"):
        make(algo, backbone="tiny")
