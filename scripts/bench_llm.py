"""Decoder-LLM benchmarks: LoRA second-order MAML with the verbalizer head, with and without
checkpointed inner steps and with LoRA in the last k blocks only (the blocks below run once
per episode) and with a meta-batch side by side; in-context learning with and without
shared-prefix scoring; and test-time adaptation of the LoRA verbalizer on validation episodes,
LoRA in every block against the last k blocks and against blocks of episodes side by side
(speed and paired accuracy: the choice of k is made on validation classes).

    python scripts/bench_llm.py                        # CPU, backbone=smollm2 (offline)
    python scripts/bench_llm.py --device cuda --precision bf16 \
        --out benchmarks/results-llm-cuda.json
    python scripts/bench_llm.py --backbone tiny-llama --steps 1 --warmup 0 --episodes 2  # smoke
    python scripts/bench_llm.py --task "task=banking77 task.data_dir=../shared/data/banking77" \
        --adapt-layers 2,4 --adapt-episodes 20   # validation episodes of BANKING77 split 01
    python scripts/bench_llm.py --episode-batch 4 --bf16-cells ...   # episodes side by side

Each cell runs in a fresh process (scripts/bench.py's `run_cell`). Writes a JSON results file
and the `bench-llm:<device>` block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import (  # noqa: E402
    SHAPE,
    add_budget,
    add_task,
    hardware_overrides,
    log,
    machine,
    run_cell,
    start_budget,
    write,
)

from benchmarks.tables import failure, fmt, rate  # noqa: E402

BF16 = "hardware.precision=bf16"
VERBALIZER = ["algo=maml", "algo.head=verbalizer", "algo.adapt=lora", "backbone.trainable=none"]
TRAIN = {
    "maml-lora-verbalizer": VERBALIZER,
    "maml-lora-verbalizer-ckpt": [*VERBALIZER, "algo.checkpoint_inner_steps=true"],
    "fomaml-lora-verbalizer": ["algo=fomaml", *VERBALIZER[1:]],
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = [*SHAPE, f"task.shots={args.shots}", *shlex.split(args.task),
            *hardware_overrides(args), f"backbone={args.backbone}"]  # fmt: skip
    results: dict[str, Any] = {"train": {}, "icl": {}, "adapt": {}}
    if args.only_adapt:
        results["adapt"] = measure_adapt(args, base)
        return results
    for label, overrides in train_cells(args).items():
        cell = run_cell("train", {"overrides": base + overrides, "warmup": args.warmup,
                                  "steps": args.steps}, args.threads)  # fmt: skip
        results["train"][label] = cell
        log(f"{args.backbone}/{label}: {cell}")
    cell = run_cell("icl", {"overrides": [*base, "algo=icl"], "episodes": args.episodes,
                            "unshared": args.unshared}, args.threads)  # fmt: skip
    results["icl"] = cell
    log(f"{args.backbone}/icl: {cell}")
    if args.adapt_episodes:
        results["adapt"] = measure_adapt(args, base)
    return results


def train_cells(args: argparse.Namespace) -> dict[str, list[str]]:
    """Label -> overrides of the training cells: --train, the top-k ones, with --episode-batch
    N a meta-batch of N episodes side by side, and with --bf16-cells each again computing in
    bf16 (the last override wins)."""
    train = {k: v for k, v in TRAIN.items() if k in args.train}
    for k in args.adapt_layers:  # LoRA in the last k blocks only: the bottom runs once
        train[f"maml-lora-verbalizer-top{k}"] = [*VERBALIZER, f"algo.adapt_layers={k}"]
    for n in args.episode_batch:  # the whole meta-batch in one inner loop
        train[f"maml-lora-verbalizer-batch{n}"] = [
            *VERBALIZER, f"hardware.episode_batch={n}", f"train.meta_batch_size={n}",
            f"train.episodes_per_backward={n}"]  # fmt: skip
    return bf16_twins(train) if args.bf16_cells else train


def bf16_twins(cells: dict[str, list[str]]) -> dict[str, list[str]]:
    """The cells, then each again as '<label>-bf16' computing in bf16 (the last override wins)."""
    return cells | {f"{label}-bf16": [*extra, BF16] for label, extra in cells.items()}


def adapt_variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Label -> overrides of the adaptation cells: LoRA in every block (today's path), in the
    last k blocks with the blocks below run once per episode, each again in bf16 with
    --bf16-cells, and (smallest k, fp32) the lower blocks run at every step."""
    variants: dict[str, list[str]] = {"all": []}
    for k in args.adapt_layers:
        variants[f"top{k}"] = [f"algo.adapt_layers={k}"]
        for lr in args.adapt_rates:  # fewer adapted blocks may want a larger inner rate
            variants[f"top{k}-lr{lr:g}"] = [f"algo.adapt_layers={k}", f"algo.inner_lr={lr:g}"]
    for n in args.episode_batch:  # blocks of n validation episodes side by side
        variants[f"all-batch{n}"] = [f"hardware.episode_batch={n}"]
    if args.bf16_cells:
        variants = bf16_twins(variants)
    if args.cast_output_cells:  # each again with the output layer cast at every call
        variants |= {f"{label}-castout": extra for label, extra in variants.items()}
    if args.adapt_layers and not args.only_adapt:
        k = min(args.adapt_layers)
        variants[f"top{k}-uncached"] = [f"algo.adapt_layers={k}", "algo.cache_frozen_layers=false"]
    return variants


def measure_adapt(args: argparse.Namespace, base: list[str]) -> dict[str, Any]:
    """Test-time adaptation of the LoRA verbalizer (eval_steps inner steps per episode) on the
    same validation episodes, one cell per `adapt_variants`."""
    common = [*base, *VERBALIZER, f"algo.eval_inner_steps={args.eval_steps}"]
    cells = {}
    for label, extra in adapt_variants(args).items():
        cells[label] = run_cell("adapt", {"overrides": common + extra,
                                          "episodes": args.adapt_episodes, "split": "valid",
                                          "cast_output": label.endswith("-castout")},
                                args.threads)  # fmt: skip
        log(f"{args.backbone}/adapt {label}: {cells[label]}")
    return cells


def render(payload: dict[str, Any]) -> str:
    res, m = payload["results"], payload["machine"]
    lines = [
        f"{m['device']} ({m.get('gpu') or m['cpu']}, {m['threads']} threads), {m['precision']}, "
        f"backbone={payload['backbone']}, 5-way {payload['shots']}-shot, 5 queries per class; "
        f"`{payload['command']}`",
    ]
    if res["train"]:
        lines += ["", *render_train(res["train"])]
    if res["icl"]:
        lines += ["", *render_icl(res["icl"])]
    if res.get("adapt"):
        lines += ["", *render_adapt(res["adapt"])]
    return "\n".join(lines)


def render_train(cells: dict[str, Any]) -> list[str]:
    lines = ["| LoRA MAML, verbalizer head | episodes/s | peak memory (MB) | GFLOPs per episode |",
             "|---|---|---|---|"]  # fmt: skip
    for label, cell in cells.items():
        if "error" in cell:
            lines.append(f"| {label} | {failure(cell)} | | |")
            continue
        lines.append(f"| {label} | {fmt(rate(cell), '.3f')} | {fmt(cell['peak_mb'], '.0f')} | "
                     f"{fmt(cell['flops'] / cell['episodes'] / 1e9, '.0f')} |")  # fmt: skip
    return lines


def render_icl(icl: dict[str, Any]) -> list[str]:
    lines = ["| in-context learning | episodes | episodes/s | accuracy |", "|---|---|---|---|"]
    if "error" in icl:
        return [*lines, f"| {failure(icl)} | | | |"]
    for label, name in (("unshared", "each (query, label) alone"), ("shared", "shared prefix")):
        c = icl[label]
        lines.append(f"| {name} | {c['episodes']} | {c['episodes_per_second']:.3f} | "
                     f"{100 * c['acc']:.1f} |")  # fmt: skip
    speedup = icl["shared"]["episodes_per_second"] / icl["unshared"]["episodes_per_second"]
    return [*lines, f"\nShared-prefix scoring: {speedup:.1f}x the episodes/s."]


def adapt_name(label: str) -> str:
    """'all', 'top2', 'top2-uncached', 'all-bf16', 'top2-bf16', 'all-batch4', 'top4-lr0.3',
    'top8-castout' in words."""
    head, *rest = label.split("-")
    if head == "all":
        name = "LoRA in every block (the path before issue 25)"
    else:
        at = "at every step" if "uncached" in rest else "once per episode"
        name = f"LoRA in the last {head[3:]} blocks, lower blocks {at}"
    for part in rest:
        if part.startswith("batch"):
            name = f"{name}, {part[5:]} episodes side by side"
        if part.startswith("lr"):
            name = f"{name}, inner rate {part[2:]}"
    name = f"{name}, bf16" if "bf16" in rest else name
    return f"{name}, output layer cast at every call" if "castout" in rest else name


def render_adapt(cells: dict[str, Any]) -> list[str]:
    """The adaptation cells: speed against LoRA in every block, on the same validation
    episodes (accuracy paired: mean difference of the episodes' accuracies)."""
    base = cells.get("all", {})
    lines = ["| LoRA verbalizer, test-time adaptation (validation episodes) | episodes/s | "
             "speed-up | accuracy | paired difference |", "|---|---|---|---|---|"]  # fmt: skip
    for label, cell in cells.items():
        if "error" in cell:
            lines.append(f"| {label} | {failure(cell)} | | | |")
            continue
        name = adapt_name(label)
        speed = diff = ""
        if "error" not in base and base:
            speed = f"{cell['episodes_per_second'] / base['episodes_per_second']:.1f}x"
            pairs = [a - b for a, b in zip(cell["accuracies"], base["accuracies"], strict=True)]
            diff = f"{100 * sum(pairs) / len(pairs):+.1f}"
        lines.append(f"| {name} | {cell['episodes_per_second']:.3f} | {speed} | "
                     f"{100 * cell['acc']:.1f} ± {100 * cell['ci95']:.1f} | {diff} |")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="measured outer steps per cell")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--episodes", type=int, default=20, help="ICL episodes, shared prefix")
    p.add_argument("--unshared", type=int, default=3, help="ICL episodes scored pair by pair")
    p.add_argument(
        "--train",
        type=lambda s: s.split(","),
        default=list(TRAIN),
        help=f"train cells besides the top-k ones (default: {','.join(TRAIN)})",
    )
    p.add_argument(
        "--adapt-layers",
        type=lambda s: [int(k) for k in s.split(",") if k],
        default=[2, 4],
        help="LoRA in the last k blocks: train and adapt cells",
    )
    p.add_argument(
        "--adapt-episodes",
        type=int,
        default=20,
        help="validation episodes per adaptation cell (0: none)",
    )
    p.add_argument("--eval-steps", type=int, default=10, help="inner steps per test episode")
    p.add_argument(
        "--adapt-rates",
        type=lambda s: [float(r) for r in s.split(",") if r],
        default=[],
        help="r[,s]: each top-k adaptation cell again at these inner rates (algo.inner_lr)",
    )
    p.add_argument(
        "--only-adapt",
        action="store_true",
        help="only the adaptation cells (no training, ICL or uncached cells)",
    )
    p.add_argument(
        "--episode-batch",
        type=lambda s: [int(n) for n in s.split(",") if n],
        default=[],
        help="N[,M]: cells adapting N episodes side by side (hardware.episode_batch)",
    )
    add_task(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument(
        "--bf16-cells",
        action="store_true",
        help="each train and adaptation cell again in bf16 (paired: the same episodes)",
    )
    p.add_argument(
        "--cast-output-cells",
        action="store_true",
        help="each adaptation cell again with the decoder's output layer cast to bf16 at every "
        "call instead of read from its stored copy (the path before it)",
    )
    p.add_argument("--threads", type=int, default=0)
    add_budget(p)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-llm-cpu.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    start_budget(args.budget)
    results = measure(args)
    command = " ".join(
        ["python scripts/bench_llm.py", *(argv if argv is not None else sys.argv[1:])]
    )
    payload = {"machine": machine(args), "command": command, "backbone": args.backbone,
               "shots": args.shots, "steps": args.steps, "warmup": args.warmup,
               "wall_seconds": time.time() - started, "results": results}  # fmt: skip
    write(args, payload, f"bench-llm:{args.device}", render(payload))


if __name__ == "__main__":
    main()
