"""Shared fixtures: everything offline, tiny random models built from the `tiny` config."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never wait on the network in tests
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per CLI run it starts): n workers on n cores, instead of
    # each worker's OpenMP pool spinning against the others' (2.5x slower on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from metarun.config import register_configs

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Twelve topics with their own words: texts of one class share vocabulary, so even a random
# encoder separates them a little and a trained one separates them well.
TOPICS = {
    "weather": "rain snow cloud storm wind sunny cold",
    "music": "guitar piano song melody drum concert band",
    "food": "bread cheese apple soup pasta salad rice",
    "sport": "football tennis goal match player team score",
    "travel": "flight hotel airport ticket train luggage trip",
    "money": "bank loan credit cash account payment card",
    "health": "doctor fever pain medicine hospital nurse cough",
    "school": "teacher exam class homework student lesson book",
    "animal": "dog cat horse bird fish cow lion",
    "tech": "computer phone software screen keyboard internet code",
    "home": "kitchen sofa door window garden roof floor",
    "car": "engine wheel brake tire fuel road driver",
}
FILLER = ["the", "a", "my", "your", "this", "that", "please", "today", "now", "again"]


def synthetic_rows(per_class: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for _ in range(per_class):
            text = " ".join(rng.sample(vocab, 3) + rng.sample(FILLER, 2))
            rows.append({"text": text, "label": label})
    return rows


@pytest.fixture
def synthetic_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "topics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    return path


@pytest.fixture(scope="session")
def compose_cfg():
    """compose(overrides) -> the resolved DictConfig that `metarun` would run with."""
    register_configs()

    def _compose(*overrides: str):
        with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def tiny_encoder(compose_cfg):
    from metarun.backbone import load_backbone

    torch.manual_seed(0)
    cfg = compose_cfg("backbone=tiny")
    return load_backbone(OmegaConf.to_object(cfg).backbone)


@pytest.fixture
def synthetic_task(compose_cfg, synthetic_jsonl):
    """TaskData over the synthetic topics with a 6 / 3 / 3 class split."""
    from metarun.task import load_task

    cfg = compose_cfg(
        "task=local", f"task.path={synthetic_jsonl}", "task.class_split=[0.5,0.25,0.25]"
    )
    return load_task(OmegaConf.to_object(cfg).task)


def seeded_algorithm(compose_cfg, task, backbone: str, *overrides: str):
    """A prepared 3-way algorithm on a fresh `backbone` (seed 0) over `task`'s texts."""
    from metarun.algo import build_algorithm
    from metarun.backbone import load_backbone

    cfg = compose_cfg(f"backbone={backbone}", *overrides)
    torch.manual_seed(0)
    encoder = load_backbone(OmegaConf.to_object(cfg).backbone)
    encoder.set_texts(task.texts)
    algo = build_algorithm(cfg.algo, encoder, 3)
    algo.prepare(task)
    return algo


def dropout_free(compose_cfg, task, *overrides: str):
    """(composed config, tiny BERT without dropout over `task`'s texts), seeded: the same
    initial weights on every call, so two builds compute the same function."""
    from metarun.backbone import load_backbone

    cfg = compose_cfg("backbone=tiny", *overrides)
    backbone = OmegaConf.to_object(cfg).backbone
    backbone.arch = {**backbone.arch, "hidden_dropout_prob": 0.0,
                     "attention_probs_dropout_prob": 0.0}  # fmt: skip
    torch.manual_seed(0)
    encoder = load_backbone(backbone)
    encoder.set_texts(task.texts)
    return cfg, encoder


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """transformers' Llama RMSNorm computes in float32 whatever its input's dtype; a finite
    difference check needs float64 throughout, so the same formula without the cast."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)
