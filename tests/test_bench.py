"""The benchmark harness: the higher reference computes what metarun's MAML computes, and
scripts/bench.py runs end to end on the tiny backbone (its timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.reference_higher import EncoderClassifier, ReferenceMAML
from metarun.algo import build_algorithm
from metarun.report.blocks import replace_block
from metarun.task import fixed_episodes
from tests.conftest import REPO, dropout_free, synthetic_rows


def test_reference_higher_loop_computes_metaruns_second_order_maml(compose_cfg, synthetic_task):
    """Same episode, same initial weights: the same query loss and the same meta-gradient, so
    bench.py's ratios compare implementations of one computation."""
    cfg, encoder = dropout_free(compose_cfg, synthetic_task, "algo=maml", "algo.head_init=learned",
                                "algo.inner_steps=2", "algo.inner_lr=0.25")  # fmt: skip
    algo = build_algorithm(cfg.algo, encoder, 3).double().train()
    (ep,) = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 1, 0, "train")
    loss, _ = algo.meta_loss([ep])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    ours["head.weight"] = algo.inner.head.weight.grad.clone()
    algo.zero_grad(set_to_none=True)

    head = torch.nn.Linear(encoder.dim, 3).double()
    with torch.no_grad():
        head.weight.copy_(algo.inner.head.weight)
        head.bias.copy_(algo.inner.head.bias)
    ref = ReferenceMAML(EncoderClassifier(encoder.model, head), encoder.tokenizer,
                        encoder.max_length, 2, 0.25, 1e-3, 0.0)  # fmt: skip
    texts = encoder.table.texts
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
def small_task(tmp_path) -> str:
    """The synthetic topics as the benchmark's task: ICD-10's 95,622 texts take each cell's
    fresh interpreter seconds to read and tokenise, which a smoke test need not pay."""
    path = tmp_path / "topics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    return (f"task=local task.path={path} task.way=3 task.shots=2 task.queries=2 "
            "task.class_split=[0.5,0.25,0.25]")  # fmt: skip


def test_bench_smoke_on_the_tiny_backbone(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\nHand-written analysis stays.\n")
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--backbones", "tiny", "--algos", "protonet,maml",
         "--steps", "1", "--warmup", "0", "--eval-episodes", "6", "--uncached", "2",
         "--eval-backbones", "tiny", "--task", small_task(tmp_path), "--out", str(out),
         "--markdown", str(md)],
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
         "--warmup", "0", "--episodes", "3", "--unshared", "3", "--adapt-layers", "1",
         "--train", "maml-lora-verbalizer,maml-lora-verbalizer-ckpt",
         "--adapt-episodes", "2", "--eval-steps", "2", "--task", small_task(tmp_path),
         "--out", str(out), "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert set(res["train"]) == {
        "maml-lora-verbalizer",
        "maml-lora-verbalizer-ckpt",
        "maml-lora-verbalizer-top1",
    }  # --train, then the top-k cell
    for label, cell in res["train"].items():
        assert "error" not in cell, (label, cell)
        assert cell["episodes"] == 2 and cell["seconds"] > 0 and cell["peak_mb"] > 0
    # Checkpointed inner steps recompute each step: more FLOPs for the same meta-gradient.
    plain, ckpt = res["train"]["maml-lora-verbalizer"], res["train"]["maml-lora-verbalizer-ckpt"]
    assert ckpt["flops"] > plain["flops"]
    icl = res["icl"]
    assert icl["shared"]["episodes"] == icl["unshared"]["episodes"] == 3
    assert icl["shared"]["acc"] == icl["unshared"]["acc"]
    adapt = res["adapt"]
    assert set(adapt) == {"all", "top1", "top1-uncached"}
    for cell in adapt.values():
        assert "error" not in cell and cell["episodes"] == 2 and cell["split"] == "valid"
    # The bottom once per episode or at every step: the same numbers (bottom.py is exact)
    assert adapt["top1"]["accuracies"] == adapt["top1-uncached"]["accuracies"]
    text = md.read_text()
    assert "<!-- bench-llm:cpu:begin -->" in text and "LoRA in the last 1 blocks" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_gpu_check_refuses_cleanly_without_cuda(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written before the refusal


def test_gpu_summary_reports_each_step_and_the_protocol_run(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "tests\t0\t41\nbench\t1\t90\nbench-llm\t124\t150\n"
        "torchrun-nccl\tskipped\t0\tone GPU: NCCL refuses two ranks on one device\n"
    )
    (tmp_path / "bench.log").write_text("cell started\nRuntimeError: CUDA out of memory\n")
    (tmp_path / "protocol").mkdir()
    summary = {"status": "completed", "test": {"acc": 0.9, "acc_ci95": 0.01, "episodes": 600},
               "wall_seconds": 55.0, "device": "cuda:0", "processes": 1}  # fmt: skip
    (tmp_path / "protocol" / "summary.json").write_text(json.dumps(summary))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_summary.py"),
                           str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # a step failed
    payload = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {s["step"]: s["status"] for s in payload["steps"]}
    assert status == {"tests": "passed", "bench": "failed", "bench-llm": "timed out",
                      "torchrun-nccl": "skipped"}  # fmt: skip
    notes = {s["step"]: s["note"] for s in payload["steps"]}
    assert notes["bench"] == "RuntimeError: CUDA out of memory"
    assert "two ranks" in notes["torchrun-nccl"]
    assert payload["protocol"]["test_acc"] == 0.9 and payload["torchrun_nccl"] is None
    assert "protocol run: completed" in proc.stdout


def test_a_spent_budget_records_cells_as_not_run_and_still_writes(tmp_path):
    """--budget: a lent GPU is held for a fixed time; cells past it are listed as not run,
    and the results file and the markdown block are written all the same."""
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--backbones", "tiny", "--algos", "protonet,maml",
         "--eval-backbones", "tiny", "--budget", "0", "--out", str(out), "--markdown", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    cells = [*res["train"].values(), *res["reference"].values(), *res["eval"].values()]
    assert len(cells) == 5 and all(c["error"].startswith("not run") for c in cells)
    text = md.read_text()
    assert "not run: --budget spent" in text and "failed" not in text


def test_llm_bench_bf16_cells_pair_every_cell_with_its_bf16_twin():
    """--bf16-cells: each training and adaptation cell again with bf16 as its last override
    (Hydra's last value wins), labelled and rendered as such; the run's own precision first."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_llm

    args = bench_llm.parse_args(["--adapt-layers", "2", "--train", "maml-lora-verbalizer",
                                 "--bf16-cells"])  # fmt: skip
    train = bench_llm.train_cells(args)
    assert list(train) == [
        "maml-lora-verbalizer",
        "maml-lora-verbalizer-top2",
        "maml-lora-verbalizer-bf16",
        "maml-lora-verbalizer-top2-bf16",
    ]
    assert train["maml-lora-verbalizer-top2-bf16"] == [*train["maml-lora-verbalizer-top2"],
                                                       "hardware.precision=bf16"]  # fmt: skip
    variants = bench_llm.adapt_variants(args)
    assert list(variants) == ["all", "top2", "all-bf16", "top2-bf16", "top2-uncached"]
    assert variants["top2-uncached"][-1] != "hardware.precision=bf16"
    plain = bench_llm.adapt_variants(bench_llm.parse_args(["--adapt-layers", "2"]))
    assert list(plain) == ["all", "top2", "top2-uncached"]
    cell = {"episodes_per_second": 1.0, "acc": 0.5, "ci95": 0.1, "accuracies": [0.5, 0.5]}
    faster = cell | {"episodes_per_second": 2.0, "accuracies": [0.5, 0.7]}
    rows = bench_llm.render_adapt({"all": cell, "all-bf16": faster})
    assert "| LoRA in every block (the path before issue 25), bf16 | 2.000 | 2.0x |" in rows[-1]
    assert rows[-1].endswith("| +10.0 |")
    assert bench_llm.adapt_name("top4-uncached") == "LoRA in the last 4 blocks, lower blocks " \
        "at every step"  # fmt: skip


def test_llm_bench_episode_batch_cells_adapt_episodes_side_by_side():
    """--episode-batch N: a training cell whose whole meta-batch of N goes side by side, and an
    adaptation cell over blocks of N validation episodes, named as such."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_llm

    args = bench_llm.parse_args(["--adapt-layers", "", "--train", "maml-lora-verbalizer",
                                 "--episode-batch", "4"])  # fmt: skip
    train = bench_llm.train_cells(args)
    assert list(train) == ["maml-lora-verbalizer", "maml-lora-verbalizer-batch4"]
    batched = train["maml-lora-verbalizer-batch4"]
    assert {"hardware.episode_batch=4", "train.meta_batch_size=4",
            "train.episodes_per_backward=4"} <= set(batched)  # fmt: skip
    assert bench_llm.adapt_variants(args) == {"all": [], "all-batch4": ["hardware.episode_batch=4"]}
    assert bench_llm.adapt_name("all-batch4-bf16") == "LoRA in every block (the path before " \
        "issue 25), 4 episodes side by side, bf16"  # fmt: skip


def test_llm_bench_rate_cells_give_each_top_k_cell_its_rates():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_llm

    args = bench_llm.parse_args(["--adapt-layers", "4", "--adapt-rates", "0.3,1", "--only-adapt"])
    assert bench_llm.adapt_variants(args) == {
        "all": [], "top4": ["algo.adapt_layers=4"],
        "top4-lr0.3": ["algo.adapt_layers=4", "algo.inner_lr=0.3"],
        "top4-lr1": ["algo.adapt_layers=4", "algo.inner_lr=1"],
    }  # fmt: skip
    assert bench_llm.adapt_name("top4-lr0.3") == "LoRA in the last 4 blocks, lower blocks once " \
        "per episode, inner rate 0.3"  # fmt: skip
    cell = {"episodes_per_second": 1.0, "acc": 0.5, "ci95": 0.1, "accuracies": [0.5, 0.5]}
    machine = {"device": "cpu", "cpu": "x", "threads": 1, "precision": "bf16"}
    text = bench_llm.render(
        {
            "machine": machine,
            "backbone": "b",
            "shots": 1,
            "command": "c",
            "results": {"train": {}, "icl": {}, "adapt": {"all": cell}},
        }
    )
    assert "in-context" not in text and "LoRA MAML" not in text  # --only-adapt ran neither
    assert "| LoRA in every block (the path before issue 25) | 1.000 | 1.0x |" in text


def test_llm_bench_cast_output_cells_time_the_path_before_the_output_copy(tmp_path):
    """--cast-output-cells: each adaptation cell again with the decoder's output layer cast at
    every call (no stored bf16 copy); both paths give the same accuracies."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_llm

    from benchmarks.measure import adapt_cell

    args = bench_llm.parse_args(["--adapt-layers", "1", "--only-adapt", "--cast-output-cells"])
    variants = bench_llm.adapt_variants(args)
    assert list(variants) == ["all", "top1", "all-castout", "top1-castout"]
    assert variants["top1-castout"] == variants["top1"]
    assert bench_llm.adapt_name("top8-bf16-castout") == "LoRA in the last 8 blocks, lower " \
        "blocks once per episode, bf16, output layer cast at every call"  # fmt: skip
    overrides = ["backbone=tiny-llama", "hardware.precision=bf16", *small_task(tmp_path).split(),
                 "algo=maml", "algo.head=verbalizer", "algo.adapt=lora",
                 "backbone.trainable=none", "algo.eval_inner_steps=2"]  # fmt: skip
    stored = adapt_cell(overrides, 2, "valid")
    cast = adapt_cell(overrides, 2, "valid", cast_output=True)
    assert stored["precision"] == cast["precision"] == "bf16"
    assert stored["accuracies"] == cast["accuracies"]
