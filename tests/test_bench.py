"""The benchmark harness: the higher reference computes what metarun's MAML computes, and
scripts/bench.py runs end to end on the tiny backbone (its timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.reference_higher import EncoderClassifier, ReferenceMAML
from metarun.algo import build_algorithm
from metarun.backbone import load_backbone
from metarun.report.blocks import replace_block
from metarun.task import fixed_episodes
from tests.conftest import REPO


def test_reference_higher_loop_computes_metaruns_second_order_maml(compose_cfg, synthetic_task):
    """Same episode, same initial weights: the same query loss and the same meta-gradient, so
    bench.py's ratios compare implementations of one computation."""
    cfg = compose_cfg("backbone=tiny", "algo=maml", "algo.head_init=learned",
                      "algo.inner_steps=2", "algo.inner_lr=0.25")  # fmt: skip
    backbone = OmegaConf.to_object(cfg).backbone
    backbone.arch = {**backbone.arch, "hidden_dropout_prob": 0.0,
                     "attention_probs_dropout_prob": 0.0}  # fmt: skip
    torch.manual_seed(0)
    encoder = load_backbone(backbone)
    encoder.set_texts(synthetic_task.texts)
    algo = build_algorithm(cfg.algo, encoder, 3).double().train()
    (ep,) = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 1, 0, "train")
    loss, _ = algo.meta_loss([ep])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    ours["head.weight"] = algo.inner.head_weight.grad.clone()
    algo.zero_grad(set_to_none=True)

    head = torch.nn.Linear(encoder.dim, 3).double()
    with torch.no_grad():
        head.weight.copy_(algo.inner.head_weight)
        head.bias.copy_(algo.inner.head_bias)
    ref = ReferenceMAML(EncoderClassifier(encoder.model, head), encoder.tokenizer,
                        encoder.max_length, 2, 0.25, 1e-3, 0.0)  # fmt: skip
    texts = encoder.texts
    ref_loss = ref.episode_loss(([texts[i] for i in ep.support.ids], ep.support.labels),
                                ([texts[i] for i in ep.query.ids], ep.query.labels))  # fmt: skip
    ref_loss.backward()
    assert float(ref_loss.detach()) == pytest.approx(float(loss.detach()), abs=1e-10)
    theirs = {n: p.grad for n, p in encoder.model.named_parameters() if p.grad is not None}
    theirs["head.weight"] = head.weight.grad
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-9), name


def test_replace_block_rewrites_only_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    replace_block(doc, "x", "first")
    doc.write_text("# Title\nprose before\n\n" + doc.read_text() + "\nprose after\n")
    replace_block(doc, "x", "second")
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text
    assert "second" in text and "first" not in text and text.count("<!-- x:begin -->") == 1


@pytest.mark.slow
def test_bench_smoke_on_the_tiny_backbone(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\nHand-written analysis stays.\n")
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--backbones", "tiny", "--algos", "protonet,maml",
         "--steps", "1", "--warmup", "0", "--eval-episodes", "6", "--uncached", "2",
         "--eval-backbones", "tiny", "--out", str(out), "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    res = payload["results"]
    assert res["matmul_peak"]["flops_per_second"] > 0
    for cell in (res["train"]["tiny/protonet"], res["train"]["tiny/maml"],
                 res["reference"]["tiny"]):  # fmt: skip
        assert "error" not in cell, cell
        assert cell["episodes"] == 2 and cell["seconds"] > 0 and cell["flops"] > 0
        assert cell["peak_mb"] >= cell["idle_mb"] * 0.5
    # Second-order MAML counts far more FLOPs than ProtoNet on the same episodes, and exactly
    # as many as the reference computing the same thing.
    assert res["train"]["tiny/maml"]["flops"] > 3 * res["train"]["tiny/protonet"]["flops"]
    assert res["train"]["tiny/maml"]["flops"] <= res["reference"]["tiny"]["flops"]
    ev = res["eval"]["tiny/protonet"]
    assert ev["episodes"] == 6 and ev["distinct_texts"] <= 6 * 50 and 0.2 < ev["acc"] <= 1
    text = md.read_text()
    assert "Hand-written analysis stays." in text and "<!-- bench:cpu:begin -->" in text
    assert "MAML speed >= 1.5x the higher reference" in text and "| protonet |" in text


@pytest.mark.slow
def test_llm_bench_smoke_on_a_tiny_llama(tmp_path):
    """scripts/bench_llm.py end to end: the verbalizer MAML cells and the ICL cell, whose two
    scoring paths give one accuracy (the same scores up to rounding)."""
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_llm.py", "--backbone", "tiny-llama", "--steps", "1",
         "--warmup", "0", "--episodes", "3", "--unshared", "3", "--out", str(out),
         "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    for label, cell in res["train"].items():
        assert "error" not in cell, (label, cell)
        assert cell["episodes"] == 2 and cell["seconds"] > 0 and cell["peak_mb"] > 0
    # Checkpointed inner steps recompute each step: more FLOPs for the same meta-gradient.
    plain, ckpt = res["train"]["maml-lora-verbalizer"], res["train"]["maml-lora-verbalizer-ckpt"]
    assert ckpt["flops"] > plain["flops"]
    icl = res["icl"]
    assert icl["shared"]["episodes"] == icl["unshared"]["episodes"] == 3
    assert icl["shared"]["acc"] == icl["unshared"]["acc"]
    assert "<!-- bench-llm:cpu:begin -->" in md.read_text()
