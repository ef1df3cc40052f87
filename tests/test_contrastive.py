"""Supervised contrastive pre-training (train.contrastive_steps) and ProtoNet's logreg head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from metarun.algo.baselines import FrozenLogReg
from metarun.algo.protonet import ProtoNet
from metarun.backbone import load_backbone
from metarun.config import FrozenConfig, ProtoNetConfig, TrainConfig
from metarun.errors import MetarunError
from metarun.logger import JsonlSink, Logger
from metarun.task import EpisodeSampler, Examples, fixed_episodes
from metarun.train.contrastive import ClassBatchSampler, ContrastiveStage, supcon_loss
from metarun.train.trainer import Checkpoints, Episodes, Trainer
from tests.cli_helpers import FAST, metarun, read_jsonl


def reference_supcon(z: torch.Tensor, labels: list[int], temperature: float) -> torch.Tensor:
    """Khosla et al.'s L_out, written as loops over anchors and positives."""
    z = F.normalize(z, dim=-1)
    terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), 0)
        positives = [p for p in others if labels[p] == labels[i]]
        if positives:
            logs = [z[i] @ z[p] / temperature - denom for p in positives]
            terms.append(-torch.stack(logs).mean())
    return torch.stack(terms).mean()


def test_supcon_loss_matches_the_reference_and_skips_anchors_without_a_pair():
    torch.manual_seed(0)
    z = torch.randn(9, 6, dtype=torch.float64)
    labels = [0, 0, 1, 1, 1, 2, 2, 3, 0]  # class 3 has a single text: an anchor without a pair
    got = supcon_loss(z, torch.tensor(labels), 0.2)
    assert torch.allclose(got, reference_supcon(z, labels, 0.2))


def test_supcon_loss_is_lower_when_classes_cluster():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 4
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    clustered = centres[labels] + 0.1 * torch.randn(9, 8)
    mixed = centres[labels[torch.randperm(9)]] + 0.1 * torch.randn(9, 8)
    assert supcon_loss(clustered, labels, 0.1) < supcon_loss(mixed, labels, 0.1)


def pools(n_classes: int, per_class: int) -> dict[str, np.ndarray]:
    return {f"c{i}": np.arange(i * per_class, (i + 1) * per_class) for i in range(n_classes)}


def test_class_batches_have_distinct_classes_the_texts_of_their_class_and_resume():
    classes = pools(10, 20)
    sampler = ClassBatchSampler(classes, 4, 3, seed=[0, 3])
    first = sampler.sample()
    assert len(first.ids) == 12 and len(set(first.classes)) == 4
    for label, name in enumerate(first.classes):
        assert set(first.ids[first.labels == label].tolist()) <= set(classes[name].tolist())
    state = sampler.state_dict()
    after = [sampler.sample().ids for _ in range(3)]
    sampler.load_state_dict(state)
    assert all(torch.equal(a, sampler.sample().ids) for a in after)
    assert torch.equal(ClassBatchSampler(classes, 4, 3, seed=[0, 3]).sample().ids, first.ids)
    assert not torch.equal(ClassBatchSampler(classes, 4, 3, seed=[1, 3]).sample().ids, first.ids)


def test_class_batches_take_all_classes_when_fewer_and_add_names():
    names = {f"c{i}": 100 + i for i in range(3)}
    batch = ClassBatchSampler(pools(3, 2), 16, 4, seed=0, name_ids=names).sample()
    assert len(batch.classes) == 3 and len(batch.ids) == 3 * 5  # 2 texts drawn with replacement
    for label, name in enumerate(batch.classes):
        assert names[name] in batch.ids[batch.labels == label].tolist()


def _trainer(algo, task, tmp_path, pre: int, **train) -> Trainer:
    cfg = TrainConfig(**({"steps": 2, "meta_batch_size": 1, "val_interval": 2, "lr": 1e-3} | train))
    sampler = EpisodeSampler(task.splits["train"], 3, 1, 2, seed=0)
    val = fixed_episodes(task.splits["valid"], 3, 1, 2, 4, 0, "valid")
    logger = Logger([JsonlSink(tmp_path / "metrics.jsonl")])
    stage = ContrastiveStage(ClassBatchSampler(task.splits["train"], 4, 3, [0, 3]), pre, 0.1)
    files = Checkpoints(tmp_path / "checkpoint.pt", tmp_path / "last.pt")
    return Trainer(algo, cfg, Episodes(sampler, val, stage), logger, files)


def test_contrastive_steps_come_first_then_episodic_steps(tiny_encoder, synthetic_task, tmp_path):
    tiny_encoder.set_texts(synthetic_task.texts)
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.1))
    trainer = _trainer(algo, synthetic_task, tmp_path, pre=3, val_at_start=True)
    fit = trainer.fit()
    trainer.logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    contrastive = [r["step"] for r in rows if "train/contrastive_loss" in r]
    episodic = [r["step"] for r in rows if "train/loss" in r and "train/acc" in r]
    assert contrastive == [1, 2, 3] and episodic == [4, 5] and fit.steps_done == 5
    assert [r["step"] for r in rows if "val/acc" in r] == [0, 2, 4, 5]


def test_contrastive_steps_lower_the_contrastive_loss(tiny_encoder, synthetic_task, tmp_path):
    tiny_encoder.set_texts(synthetic_task.texts)
    tiny_encoder.eval()  # no dropout: the same batch scores the same before and after
    algo = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.1))
    batch = ClassBatchSampler(synthetic_task.splits["train"], 6, 4, seed=5).sample()
    with torch.no_grad():
        before = supcon_loss(tiny_encoder(batch.ids), batch.labels, 0.1)
    trainer = _trainer(algo, synthetic_task, tmp_path, pre=15, steps=0, val_interval=100)
    for step in range(1, 16):
        trainer.step(step)
    with torch.no_grad():
        after = supcon_loss(tiny_encoder(batch.ids), batch.labels, 0.1)
    assert after < before - 0.05


def _fresh(compose_cfg, task):
    torch.manual_seed(0)
    encoder = load_backbone(OmegaConf.to_object(compose_cfg("backbone=tiny")).backbone)
    encoder.set_texts(task.texts)
    return ProtoNet(encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.1))


def test_a_run_resumed_inside_the_contrastive_stage_ends_as_an_unbroken_one(
    compose_cfg, synthetic_task, tmp_path
):
    whole = _fresh(compose_cfg, synthetic_task)
    (tmp_path / "a").mkdir()
    _trainer(whole, synthetic_task, tmp_path / "a", pre=4, val_interval=100).fit()

    first = _fresh(compose_cfg, synthetic_task)
    (tmp_path / "b").mkdir()
    stopped = _trainer(first, synthetic_task, tmp_path / "b", pre=4, val_interval=100)
    first.train()
    for step in (1, 2):
        stopped.step(step)
        stopped.progress.step = step
    state = stopped.state()
    resumed = _trainer(_fresh(compose_cfg, synthetic_task), synthetic_task, tmp_path / "b",
                       pre=4, val_interval=100)  # fmt: skip
    resumed.resume(state)
    resumed.fit()
    expected = dict(whole.named_parameters())
    for name, param in resumed.algo.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name


def test_a_frozen_encoder_refuses_contrastive_steps(tiny_encoder, synthetic_task, tmp_path):
    algo = FrozenLogReg(tiny_encoder, 3, FrozenConfig(max_iter=50))
    with pytest.raises(MetarunError, match=r"train\.contrastive_steps=3 trains the encoder"):
        _trainer(algo, synthetic_task, tmp_path, pre=3)


def test_logreg_head_evaluates_as_frozen_logreg_and_trains_with_prototypes(
    tiny_encoder, synthetic_task
):
    tiny_encoder.set_texts(synthetic_task.texts)
    proto = ProtoNet(
        tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.1, eval_head="logreg", c=1.0)
    )
    frozen = FrozenLogReg(tiny_encoder, 3, FrozenConfig())
    ep = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 1, 0, "test")[0]
    proto.eval()
    with torch.no_grad():
        got = proto.adapt(ep.support, 3)(ep.query)
        assert torch.allclose(got, frozen.adapt(ep.support, 3)(ep.query), atol=1e-5)
    plain = ProtoNet(tiny_encoder, 3, ProtoNetConfig(metric="cosine", temperature=0.1))
    proto.train(), plain.train(), tiny_encoder.eval()  # training mode, dropout off
    trained = proto.adapt(ep.support, 3)(ep.query)
    assert torch.allclose(trained, plain.adapt(ep.support, 3)(ep.query))


def test_cli_contrastive_stage_and_its_bad_values(tmp_path, synthetic_jsonl):
    args = [*FAST, f"task.path={synthetic_jsonl}", "train.steps=2", "train.contrastive_steps=2",
            "train.contrastive_classes=3", "algo.eval_head=logreg",
            "train.val_interval=2"]  # fmt: skip
    proc = metarun(*args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/contrastive_loss" in r] == [1, 2]
    bad = metarun(*args, "train.contrastive_per_class=1", f"run_dir={tmp_path / 'bad'}",
                  cwd=tmp_path)  # fmt: skip
    assert bad.returncode != 0
    assert "train.contrastive_per_class=1 is out of range: it must be >= 2" in bad.stderr


class TableEncoder(torch.nn.Module):
    """An encoder whose text i embeds as row i of a fixed table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def reference_soft_kmeans(s, ys, q, way, steps, temperature):
    """The refinement written out per class: centre, normalise, weighted means."""
    s, q = F.normalize(s, dim=-1), F.normalize(q, dim=-1)
    centre = torch.cat([s, q]).mean(0)
    s, q = s - centre, q - centre
    protos = torch.stack([s[ys == c].mean(0) for c in range(way)])
    for _ in range(steps):
        w = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).T / temperature, -1)
        protos = torch.stack([
            (s[ys == c].sum(0) + (w[:, c, None] * q).sum(0)) / ((ys == c).sum() + w[:, c].sum())
            for c in range(way)
        ])  # fmt: skip
    return F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).T / temperature


def test_transductive_prototypes_follow_the_queries_at_evaluation_only():
    torch.manual_seed(0)
    table = torch.randn(20, 4, dtype=torch.float64)
    algo = ProtoNet(
        TableEncoder(table),
        2,
        ProtoNetConfig(metric="cosine", temperature=0.2, transductive_steps=3),
    )
    support = Examples(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]), ("a", "b"))
    query = Examples(torch.arange(4, 10), torch.tensor([0, 1, 0, 1, 0, 1]), ("a", "b"))
    algo.eval()
    with torch.no_grad():
        got = algo.adapt(support, 2)(query)
        expected = reference_soft_kmeans(table[:4], support.labels, table[4:10], 2, 3, 0.2)
        assert torch.allclose(got, expected)
        ids = torch.cat([query.ids[:1], torch.arange(14, 19)])  # the first query, new others
        others = Examples(ids, query.labels, ("a", "b"))
        assert not torch.allclose(algo.adapt(support, 2)(others)[0], got[0])  # reads the others
    algo.train()
    plain = ProtoNet(TableEncoder(table), 2, ProtoNetConfig(metric="cosine", temperature=0.2))
    assert torch.allclose(algo.adapt(support, 2)(query), plain.adapt(support, 2)(query))


def test_cli_recommended_recipe_runs_end_to_end(tmp_path, synthetic_jsonl):
    run = tmp_path / "recipe"
    shape = [a for a in FAST if not a.startswith("train.")]  # the recipe's training keys
    proc = metarun(*shape, f"task.path={synthetic_jsonl}", "+experiment=recommended",
                   "train.contrastive_classes=4", f"run_dir={run}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train"]["steps_done"] == 50
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/acc" in r] == [0, 25, 50]
    assert summary["val"]["best_step"] in (0, 25, 50)
