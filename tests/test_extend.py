"""Extending metarun: a head and an algorithm are each one new class plus a config, used by the
existing code unchanged (README, "Adding an algorithm, a head or a backbone")."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from metarun.algo import Algorithm, build_algorithm
from metarun.algo.adapted import encoder_params
from metarun.algo.heads import HEADS
from metarun.algo.protonet import prototypes
from metarun.backbone import load_backbone
from metarun.checks import check_config
from metarun.config import InnerLoopFields
from metarun.errors import MetarunError
from metarun.task import fixed_episodes
from metarun.train import evaluate


class PrototypeHead(torch.nn.Module):
    """A head with no tensors of its own: queries scored by distance to the support set's
    prototypes under the adapted encoder weights."""

    names: tuple[str, ...] = ()
    cuts_table = True
    default_adapt = "bias"
    no_head = "has no tensors of its own"

    def __init__(self, encoder, way: int, cfg: InnerLoopFields) -> None:
        super().__init__()
        self.support = None

    def prepare(self, data) -> None:
        pass

    def initial(self, name: str):
        return None

    def start(self, encoder, support, way, track, adapts_encoder, like):
        self.support = (support, way)
        return {}, None

    def scores(self, encoder, examples, params, vocab=None, feats=None):
        support, way = self.support
        own = encoder_params(params)
        protos = prototypes(encoder(support.ids, params=own, vocab=vocab), support.labels, way)
        queries = encoder(examples.ids, params=own, vocab=vocab)
        return -(queries[:, None] - protos[None]).pow(2).sum(-1)  # double-differentiable

    def objective(self, encoder, data):
        raise NotImplementedError


@pytest.fixture
def build(compose_cfg, synthetic_task):
    def _build(*overrides: str):
        cfg = compose_cfg("backbone=tiny", *overrides)
        check_config(cfg)
        torch.manual_seed(0)
        encoder = load_backbone(OmegaConf.to_object(cfg).backbone)
        encoder.set_texts(synthetic_task.texts)
        algo = build_algorithm(OmegaConf.to_object(cfg).algo, encoder, 3, ["tests"])
        algo.prepare(synthetic_task)
        return algo

    return _build


def test_a_new_head_runs_under_maml_and_reptile_unchanged(build, synthetic_task, monkeypatch):
    with pytest.raises(MetarunError, match=r"algo\.head=prototype; use one of linear, verbalizer"):
        build("algo=maml", "algo.head=prototype")
    monkeypatch.setitem(HEADS, "prototype", PrototypeHead)
    episodes = fixed_episodes(synthetic_task.splits["train"], 3, 2, 2, 2, 0, "train")
    for name in ("maml", "reptile"):
        algo = build(f"algo={name}", "algo.head=prototype", "algo.inner_steps=2").train()
        assert isinstance(algo.inner.head, PrototypeHead) and algo.inner.names  # adapt=bias
        loss, _ = algo.meta_loss(episodes)
        loss.backward()
        grads = [p.grad for p in algo.encoder.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)
        assert 0 <= evaluate(algo, episodes).acc <= 1
    with pytest.raises(MetarunError, match=r"algo\.head=prototype has no tensors of its own"):
        build("algo=maml", "algo.head=prototype", "algo.adapt=head")


@dataclass
class NearestSupportConfig:
    _target_: str = "tests.test_extend.NearestSupport"
    temperature: float = 1.0


class NearestSupport(Algorithm):
    """A user's algorithm: each query takes the label of its nearest support text."""

    config = NearestSupportConfig

    def __init__(self, encoder, way: int, cfg: NearestSupportConfig) -> None:
        super().__init__(encoder, way)
        self.temperature = cfg.temperature

    def adapt(self, support, way):
        keys = self.encoder(support.ids)
        onehot = torch.nn.functional.one_hot(support.labels.to(keys.device), way).float()

        def predict(query):
            near = (-torch.cdist(self.encoder(query.ids), keys) / self.temperature).softmax(-1)
            return (near @ onehot).log()

        return predict


def test_a_users_algorithm_is_built_from_its_own_schema(tiny_encoder, synthetic_task):
    """A user's YAML (no schema in metarun) composes to a plain mapping, as here."""
    tiny_encoder.set_texts(synthetic_task.texts)
    node = {"_target_": "tests.test_extend.NearestSupport", "temperature": 0.5}
    with pytest.raises(MetarunError, match=r"allow its module with algo_modules=\[tests\]"):
        build_algorithm(node, tiny_encoder, 3)
    algo = build_algorithm(node, tiny_encoder, 3, ["tests"])
    assert isinstance(algo, NearestSupport) and algo.temperature == 0.5
    episodes = fixed_episodes(synthetic_task.splits["test"], 3, 2, 2, 4, 0, "test")
    assert 0 <= evaluate(algo, episodes).acc <= 1
    typo = {"_target_": node["_target_"], "temprature": 0.5}
    with pytest.raises(MetarunError, match=r"algo\.temprature is not an option of NearestSupport"):
        build_algorithm(typo, tiny_encoder, 3, ["tests"])
