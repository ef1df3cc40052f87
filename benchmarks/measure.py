"""One benchmark measurement ("cell"), run in a fresh process by scripts/bench.py.

Each cell builds what `metarun` would build from the same config overrides (compose, backbone,
algorithm, the real `Trainer.step`), draws its episodes once and times the steps warm; replays
of the very same episodes give their peak memory and, under `FlopCounterMode`, their FLOPs. A
fresh process per cell keeps peak memory honest: on CPU the kernel's high-water mark (VmHWM) is
reset before the replay, after glibc has handed back the free heap it kept; on CUDA the
allocator's peak is.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_higher import EncoderClassifier, ReferenceMAML
from metarun.algo import build_algorithm
from metarun.algo.adapted import inner_rate
from metarun.backbone import Encoder, load_backbone
from metarun.config import MetarunConfig, register_configs
from metarun.experiment import set_episode_batch, set_precision
from metarun.hardware import Hardware, seed_everything, setup_hardware
from metarun.logger import Logger
from metarun.task import STREAM, Episode, EpisodeSampler, fixed_episodes, load_task
from metarun.train import Checkpoints, Episodes, Runtime, Trainer
from metarun.train.evaluate import evaluate


def compose_config(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ---------------------------------------------------------------- memory and time


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_free_heap()
        # Linux: "5" resets this process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def release_free_heap() -> None:
    """Hand memory that earlier work freed back to the kernel (glibc keeps freed heap
    resident), so that resident size and the next peak are the coming steps' own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing retained to release this way
        return
    libc.malloc_trim(0)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def in_use_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_mb()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    step: Callable[[Any], Any], batches: list, warmup: int, device: torch.device
) -> dict[str, float]:
    """Run `warmup` untimed steps, then time the rest (warm: nothing released in between)."""
    if device.type == "cpu":
        release_free_heap()  # idle measured without what loading left freed but resident
    idle = in_use_mb(device)
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync(device)
    return {"seconds": time.perf_counter() - start, "idle_mb": idle}


def replayed(
    step: Callable[[Any], Any], batches: list, device: torch.device, rewind: Callable[[], None]
) -> dict[str, float]:
    """The measured steps twice more: from a reset peak for their peak memory (not the
    warm-up's, which the timed run still holds as free heap; resetting before the timed steps
    would make them pay page faults anew), then under the FLOP counter, whose module tracking
    holds tensors of its own (MiniLM's first-order MAML peaked 3.3x higher under it)."""
    rewind()
    reset_peak(device)
    for batch in batches:
        step(batch)
    sync(device)
    peak = peak_mb(device)
    rewind()
    with FlopCounterMode(display=False) as counter:
        for batch in batches:
            step(batch)
    return {"peak_mb": peak, "flops": float(counter.get_total_flops())}


# ---------------------------------------------------------------- building blocks


class Replay:
    """A sampler that hands out pre-drawn episodes, so a replay sees exactly the same ones."""

    def __init__(self, episodes: list[Episode]) -> None:
        self.episodes, self.next = episodes, 0

    def sample(self) -> Episode:
        episode = self.episodes[self.next]
        self.next += 1
        return episode


def build(overrides: list[str]):
    """(typed config, raw config, hardware, task data, encoder) as `metarun` builds them."""
    cfg = compose_config(overrides)
    typed: MetarunConfig = OmegaConf.to_object(cfg)
    hw = setup_hardware(typed.hardware)
    seed_everything(typed.seed)
    data = load_task(typed.task)
    encoder = load_backbone(typed.backbone)
    encoder.set_texts(data.texts)
    return typed, cfg, hw, data, encoder


def build_algo(cfg: DictConfig, typed: MetarunConfig, hw: Hardware, data, encoder):
    """The prepared algorithm on the device, in the precision `metarun` would choose (after
    which `hw.autocast` is the run's)."""
    algo = build_algorithm(cfg.algo, encoder, typed.task.way)
    algo.prepare(data)
    algo = algo.to(hw.device)
    set_precision(hw, algo, parameter_count(encoder))
    set_episode_batch(algo, typed.hardware.episode_batch)
    return algo


def draw(data, typed: MetarunConfig, n: int) -> list[Episode]:
    task = typed.task
    sampler = EpisodeSampler(data.splits["train"], task.way, task.shots, task.queries,
                             seed=[typed.seed, STREAM["train"]])  # fmt: skip
    return [sampler.sample() for _ in range(n)]


def parameter_count(encoder: Encoder) -> int:
    return sum(p.numel() for p in encoder.model.parameters())


def build_for_eval(overrides: list[str], episodes: int, split: str = "test"):
    """(hardware, encoder, prepared algorithm, the first `episodes` fixed episodes of
    `split`: test, or valid where a choice is being made)."""
    typed, cfg, hw, data, encoder = build(overrides)
    algo = build_algo(cfg, typed, hw, data, encoder)
    task = typed.task
    fixed = fixed_episodes(data.splits[split], task.way, task.shots, task.queries, episodes,
                           task.eval_seed, split)  # fmt: skip
    return hw, encoder, algo, fixed


# ---------------------------------------------------------------- cells


def train_cell(overrides: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """Meta-training throughput, peak memory and FLOPs of metarun's own outer step."""
    typed, cfg, hw, data, encoder = build(overrides)
    algo = build_algo(cfg, typed, hw, data, encoder)
    device, autocast = hw.device, hw.autocast
    batch = typed.train.meta_batch_size
    episodes = draw(data, typed, batch * (warmup + steps))
    replay = Replay(episodes)
    trainer = Trainer(algo, typed.train, Episodes(replay, []), Logger([]),
                      Checkpoints(Path("unused.pt")), Runtime(autocast))  # fmt: skip
    algo.train()
    timing = timed_steps(trainer.step, list(range(warmup + steps)), warmup, device)

    def rewind() -> None:  # the measured episodes again
        replay.next = warmup * batch

    return {**timing, **replayed(trainer.step, list(range(steps)), device, rewind),
            "episodes": steps * batch, "params": parameter_count(encoder),
            "device": str(device), "precision": hw.precision}  # fmt: skip


def reference_cell(overrides: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """The same episodes through benchmarks/reference_higher.py (second-order MAML, higher)."""
    typed, cfg, hw, data, encoder = build(overrides)
    device = hw.device
    way, batch = typed.task.way, typed.train.meta_batch_size
    head = torch.nn.Linear(encoder.dim, way)
    with torch.no_grad():  # the initial head of algo.head_init=learned
        head.weight.copy_(torch.randn(way, encoder.dim) * encoder.dim**-0.5)
        head.bias.zero_()
    net = EncoderClassifier(encoder.model, head).to(device)
    ref = ReferenceMAML(net, encoder.tokenizer, encoder.max_length, cfg.algo.inner_steps,
                        inner_rate(cfg.algo.inner_lr, "all", 1e-3), typed.train.lr,
                        typed.train.grad_clip)  # fmt: skip
    texts = encoder.table.texts
    episodes = [
        ((([texts[i] for i in ep.support.ids], ep.support.labels)),
         ([texts[i] for i in ep.query.ids], ep.query.labels))
        for ep in draw(data, typed, batch * (warmup + steps))
    ]  # fmt: skip
    batches = [episodes[i : i + batch] for i in range(0, len(episodes), batch)]
    net.train()
    timing = timed_steps(ref.step, batches, warmup, device)
    return {**timing, **replayed(ref.step, batches[warmup:], device, lambda: None),
            "episodes": steps * batch,
            "params": parameter_count(encoder), "device": str(device)}  # fmt: skip


def matmul_peak_cell(device_name: str, precision: str, n: int, repeats: int) -> dict[str, Any]:
    """The machine's measured matmul rate (FLOP/s): the denominator of MFU."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return {"flops_per_second": 2 * n**3 / best, "n": n, "dtype": str(dtype), "repeats": repeats,
            "threads": torch.get_num_threads()}  # fmt: skip


def eval_cell(overrides: list[str], episodes: int, uncached: int) -> dict[str, Any]:
    """A frozen encoder's evaluation over `episodes` fixed test episodes against one encoding
    pass over their distinct texts (length-sorted batches, the fastest plain pass)."""
    hw, encoder, algo, test = build_for_eval(overrides, episodes)
    device, autocast = hw.device, hw.autocast
    ids = torch.unique(torch.cat([ep.text_ids() for ep in test]))
    ids = ids[torch.argsort(encoder.table.lengths[ids.to(encoder.table.lengths.device)].cpu())]
    with torch.no_grad(), autocast():
        encoder(ids[:8])  # warm-up of kernels and allocator
        sync(device)
        start = time.perf_counter()
        for chunk in ids.split(256):
            encoder(chunk)
        sync(device)
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(algo, test, autocast)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"episodes": episodes, "distinct_texts": len(ids), "one_pass_seconds": one_pass,
           "eval_seconds": seconds, "acc": result.acc, "device": str(device),
           "precision": hw.precision}  # fmt: skip
    if uncached:
        with uncached_eval(algo):
            start = time.perf_counter()
            evaluate(algo, test[:uncached], autocast)
            sync(device)
        out |= {"uncached_episodes": uncached, "uncached_seconds": time.perf_counter() - start}
    return out


def icl_cell(overrides: list[str], episodes: int, unshared: int) -> dict[str, Any]:
    """In-context learning's test episodes per second with the demonstrations shared by every
    query and each query by every label (backbone/prompts.py), against each (query, label)
    sequence scored alone on the first `unshared` of the same episodes; their scores agree."""
    hw, encoder, algo, test = build_for_eval(overrides, episodes)
    device, autocast = hw.device, hw.autocast
    out: dict[str, Any] = {"device": str(device), "params": parameter_count(encoder),
                           "precision": hw.precision}  # fmt: skip
    for label, shared, n in (("shared", True, episodes), ("unshared", False, unshared)):
        algo.shared_prefix = shared
        with torch.no_grad(), autocast():
            algo.eval().adapt(test[0].support, test[0].way)(test[0].query)  # warm-up
        sync(device)
        start = time.perf_counter()
        result = evaluate(algo, test[:n], autocast)
        sync(device)
        seconds = time.perf_counter() - start
        out[label] = {"episodes": n, "seconds": seconds, "episodes_per_second": n / seconds,
                      "acc": result.acc}  # fmt: skip
    return out


def adapt_cell(
    overrides: list[str], episodes: int, split: str, cast_output: bool = False
) -> dict[str, Any]:
    """Adapted episodes per second (each: the inner loop on its support set, then its queries)
    and their accuracies, on the fixed episodes of `split` (valid: choices are made there).
    `cast_output`: a decoder's output layer cast at every call under bf16 (no stored copy,
    backbone/lowp.py), the path before that copy."""
    hw, encoder, algo, fixed = build_for_eval(overrides, episodes, split)
    if cast_output:
        encoder.output_low = None
    device, autocast = hw.device, hw.autocast
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    result = evaluate(algo, fixed, autocast)
    sync(device)
    seconds = time.perf_counter() - start
    return {"episodes": episodes, "split": split, "seconds": seconds,
            "episodes_per_second": episodes / seconds, "acc": result.acc, "ci95": result.ci95,
            "accuracies": result.accuracies.tolist(), "peak_mb": peak_mb(device),
            "params": parameter_count(encoder), "device": str(device),
            "precision": hw.precision}  # fmt: skip


@contextlib.contextmanager
def uncached_eval(algo) -> Iterator[None]:
    """Evaluation that encodes every episode's texts anew: what the cache saves."""
    before = algo.feature_cache
    algo.feature_cache = False
    try:
        yield
    finally:
        algo.feature_cache = before


CELLS = {"train": train_cell, "reference": reference_cell, "matmul_peak": matmul_peak_cell,
         "eval": eval_cell, "icl": icl_cell, "adapt": adapt_cell}  # fmt: skip
