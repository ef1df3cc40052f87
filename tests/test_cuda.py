"""The CUDA tier: the same numbers on a GPU as on the CPU, bf16 autocast inside the inner loop,
and a whole run through the CLI on `hardware=cuda`. `scripts/gpu_check.sh` runs these; they are
skipped where no CUDA device is visible (CI has none).

`METARUN_CUDA_TESTS_DEVICE=cpu` runs the same assertions with the CPU standing in for the GPU,
which checks the tests themselves on a machine without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from metarun.algo import build_algorithm
from metarun.task import fixed_episodes
from metarun.train.evaluate import evaluate

from .conftest import dropout_free
from .grad_helpers import meta_grads

DEVICE = torch.device(os.environ.get("METARUN_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: fp32 on the GPU must then agree with the CPU to float rounding."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def make(compose_cfg, synthetic_task):
    """make(*algo overrides) -> a fresh dropout-free algorithm on the CPU, same initial weights."""

    def _make(*overrides: str):
        cfg, encoder = dropout_free(compose_cfg, synthetic_task, *overrides)
        algo = build_algorithm(cfg.algo, encoder, 3)
        algo.prepare(synthetic_task)
        return algo.train()

    return _make


@pytest.fixture
def episodes(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 2, 0, "train")


def assert_close(cpu: dict, gpu: dict, atol: float, rtol: float) -> None:
    assert cpu.keys() == gpu.keys() and cpu
    for name, value in cpu.items():
        assert torch.allclose(value, gpu[name].cpu(), atol=atol, rtol=rtol), name


@pytest.mark.parametrize("algo_name", ["maml", "fomaml", "anil", "reptile", "protonet"])
def test_meta_gradients_on_the_gpu_equal_the_cpu_ones(make, episodes, algo_name):
    algo = make(f"algo={algo_name}")
    on_cpu = meta_grads(algo, episodes)
    on_gpu = meta_grads(algo.to(DEVICE), episodes)
    assert_close(on_cpu, on_gpu, atol=1e-5, rtol=1e-3)


def test_lora_maml_meta_gradients_on_the_gpu_equal_the_cpu_ones(make, episodes):
    algo = make("algo=maml", "algo.adapt=lora", "backbone.trainable=none")
    assert_close(meta_grads(algo, episodes), meta_grads(algo.to(DEVICE), episodes), 1e-5, 1e-3)


@pytest.mark.parametrize("algo_name", ["protonet", "anil", "frozen"])
def test_evaluation_on_the_gpu_gives_the_cpu_accuracies(make, synthetic_task, algo_name):
    test = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 20, 1234, "test")
    algo = make(f"algo={algo_name}")
    cpu = evaluate(algo, test)
    gpu = evaluate(algo.to(DEVICE), test)
    assert list(cpu.accuracies) == list(gpu.accuracies)  # episode by episode


def test_bf16_autocast_reaches_the_inner_loop(make, episodes):
    """Second-order MAML under bf16 autocast: every linear layer of the encoder, inner steps
    included, computes in bf16, and the meta-gradient still points where fp32's does."""
    algo = make("algo=maml", "algo.inner_steps=3").to(DEVICE)
    reference = meta_grads(algo, episodes)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in algo.encoder.modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        low = meta_grads(algo, episodes)
    for hook in hooks:
        hook.remove()
    calls_per_pass = len(hooks)
    assert len(seen) >= calls_per_pass * 3 * len(episodes)  # the inner steps ran through them
    assert set(seen) == {torch.bfloat16}
    flat = lambda g: torch.cat([g[n].float().flatten().cpu() for n in sorted(g)])  # noqa: E731
    assert F.cosine_similarity(flat(reference), flat(low), dim=0) > 0.9


def test_a_whole_run_on_cuda_through_the_cli(tmp_path, synthetic_jsonl):
    run = tmp_path / "run"
    hardware = "hardware=cuda" if DEVICE.type == "cuda" else "hardware=cpu"
    args = ["backbone=tiny", "task=local", f"task.path={synthetic_jsonl}", "task.way=3",
            "task.shots=2", "task.queries=2", "task.class_split=[0.5,0.25,0.25]",
            "task.val_episodes=4", "task.test_episodes=10", "train.steps=4",
            "train.val_interval=2", "logger.progress=false", "algo=maml", hardware,
            f"run_dir={run}"]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "metarun", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["device"].startswith(DEVICE.type)
    assert summary["peak_memory_mb"] > 0
    # hardware=cuda's precision is auto: a 1M-parameter backbone stays in fp32 (hardware.py)
    assert summary["precision"]["requested"] == "auto" and summary["precision"]["used"] == "fp32"
    assert 0.0 <= summary["test"]["acc"] <= 1.0 and summary["test"]["episodes"] == 10
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ("cuda" in last["rng"][0]) == (DEVICE.type == "cuda")  # resumes its GPU draws
    best = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in best["trainable_state"].values())
