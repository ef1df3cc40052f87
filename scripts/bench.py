"""Speed and memory benchmarks: writes a JSON results file and the tables of docs/BENCHMARKS.md.

    python scripts/bench.py                                  # CPU: tiny, minilm, bert-base-random
    python scripts/bench.py --device cuda --precision bf16   # the CUDA rows
    python scripts/bench.py --backbones tiny --algos protonet,maml --steps 1 --warmup 0  # smoke

Every measurement runs in a fresh process (benchmarks/measure.py), one after another, so peak
memory is per cell and no cell competes with another for the cores. Ratios compare cells of the
same invocation. Only the part of docs/BENCHMARKS.md between the `bench:` markers is rewritten;
the analysis around it is prose kept by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tables import REFERENCE, render  # noqa: E402
from metarun.report.blocks import replace_block  # noqa: E402

# label: overrides on top of the common episode shape. Inner-loop algorithms use the default
# algo.inner_steps=5. MAML uses a meta-learned head (head_init=learned) so that it computes
# exactly what the higher reference computes.
ALGOS: dict[str, list[str]] = {
    "protonet": ["algo=protonet"],
    "maml": ["algo=maml", "algo.head_init=learned"],
    "maml-ckpt": ["algo=maml", "algo.head_init=learned", "algo.checkpoint_inner_steps=true"],
    "fomaml": ["algo=fomaml"],
    "anil": ["algo=anil"],
    "reptile": ["algo=reptile"],
    "maml-lora": ["algo=maml", "algo.adapt=lora", "backbone.trainable=none"],
    "relationnet": ["algo=relationnet"],
    "matchingnet": ["algo=matchingnet"],
    "ridge": ["algo=ridge"],
    "hypernet": ["algo=hypernet"],
    "finetune": ["algo=finetune"],
}
BACKBONES = ("tiny", "minilm", "bert-base-random")
SHAPE = ["task.way=5", "task.shots=5", "task.queries=5", "train.meta_batch_size=2"]
TASK = "task=icd10"  # --task: the benchmark rows' task (a smoke test passes a small file)


# When the whole invocation must end (time.monotonic()), set from --budget. A lent GPU or a job
# slot is held for a fixed time: cells past it are recorded as not run instead of losing them all.
DEADLINE: float | None = None
NOT_RUN = "not run: --budget spent"


def run_cell(kind: str, args: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one cell in a fresh interpreter; its last stdout line is the JSON result."""
    left = None if DEADLINE is None else DEADLINE - time.monotonic()
    if left is not None and left <= 0:
        return {"error": NOT_RUN}
    code = ("import json, sys; from benchmarks.measure import CELLS; "
            "print(json.dumps(CELLS[sys.argv[1]](**json.loads(sys.argv[2]))))")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", code, kind, json.dumps(args)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=left)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"{NOT_RUN} (stopped after {left:.0f} s)"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    # the process's whole wall time (start-up, loading, replays): what a cell costs a budget
    return {**json.loads(proc.stdout.strip().splitlines()[-1]),
            "cell_seconds": time.monotonic() - started}  # fmt: skip


def hardware_overrides(args: argparse.Namespace) -> list[str]:
    hw = "hardware=cuda" if args.device == "cuda" else "hardware=cpu"
    return [hw, f"hardware.precision={args.precision}"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    common = [*SHAPE, *shlex.split(args.task), *hardware_overrides(args)]
    results: dict[str, Any] = {"train": {}, "reference": {}, "eval": {}}
    peak_n = 4096 if args.device == "cuda" else 2048
    results["matmul_peak"] = run_cell("matmul_peak", {"device_name": args.device,
        "precision": args.precision, "n": peak_n, "repeats": 30}, args.threads)  # fmt: skip
    log(f"matmul peak: {results['matmul_peak']}")
    for backbone in args.backbones:
        base = [*common, f"backbone={backbone}"]
        steps = {"warmup": args.warmup, "steps": args.steps.get(backbone, args.steps["*"])}
        for label in args.algos:
            cell = run_cell("train", {"overrides": base + ALGOS[label], **steps}, args.threads)
            results["train"][f"{backbone}/{label}"] = cell
            log(f"{backbone}/{label}: {cell}")
        if "maml" in args.algos:
            cell = run_cell("reference", {"overrides": base + ALGOS["maml"], **steps},
                            args.threads)  # fmt: skip
            results["reference"][backbone] = cell
            log(f"{backbone}/{REFERENCE}: {cell}")
        if args.eval_episodes and backbone in args.eval_backbones:
            for label in ("protonet", "frozen"):
                overrides = [*base, f"algo={label}", "backbone.trainable=none"]
                cell = run_cell("eval", {"overrides": overrides, "episodes": args.eval_episodes,
                                         "uncached": args.uncached}, args.threads)  # fmt: skip
                results["eval"][f"{backbone}/{label}"] = cell
                log(f"{backbone}/eval {label}: {cell}")
    return results


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(), "device": args.device,
            "precision": args.precision}  # fmt: skip
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def steps_per_backbone(text: str) -> dict[str, int]:
    """ "3,bert-base-random=1" -> {"*": 3, "bert-base-random": 1}."""
    out = {"*": 3}
    for part in text.split(","):
        name, _, value = part.rpartition("=")
        out[name or "*"] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", type=lambda s: s.split(","), default=list(BACKBONES))
    p.add_argument("--algos", type=lambda s: s.split(","), default=list(ALGOS))
    p.add_argument(
        "--steps",
        type=steps_per_backbone,
        default="3,bert-base-random=1",
        help="measured outer steps per cell: N for all, or backbone=N exceptions",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed outer steps before them")
    p.add_argument("--eval-episodes", type=int, default=600)
    p.add_argument("--eval-backbones", type=lambda s: s.split(","), default=["tiny", "minilm"])
    p.add_argument(
        "--uncached",
        type=int,
        default=100,
        help="episodes evaluated without the feature cache, for contrast",
    )
    add_task(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell; 0: default")
    add_budget(p)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-cpu.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args(argv)
    unknown = sorted(set(args.algos) - set(ALGOS))
    if unknown:
        p.error(f"--algos: unknown {', '.join(unknown)}; choose from {', '.join(ALGOS)}")
    return args


def add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=TASK,
                   help=f"task overrides after the episode shape (default: {TASK})")  # fmt: skip


def add_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole invocation; cells past it are recorded as not "
                        "run, and the results written all the same")  # fmt: skip


def start_budget(seconds: float | None) -> None:
    global DEADLINE
    DEADLINE = None if seconds is None else time.monotonic() + seconds


def write(args: argparse.Namespace, payload: dict[str, Any], block: str, markdown: str) -> None:
    """The results file, and the generated `block` of the markdown page (prose kept)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {args.out}")
    if args.markdown:
        replace_block(args.markdown, block, markdown)
        log(f"updated {args.markdown}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    start_budget(args.budget)
    results = measure(args)
    command = " ".join(["python scripts/bench.py", *(argv if argv is not None else sys.argv[1:])])
    payload = {"machine": machine(args), "command": command, "steps": args.steps,
               "warmup": args.warmup, "wall_seconds": time.time() - started,
               "results": results}  # fmt: skip
    write(args, payload, f"bench:{args.device}", render(payload))


if __name__ == "__main__":
    main()
