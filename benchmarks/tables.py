"""Markdown for docs/BENCHMARKS.md from scripts/bench.py's results (written between markers by
metarun.report.blocks.replace_block, the rewriter metarun-report uses too: prose is kept)."""

from __future__ import annotations

from typing import Any

REFERENCE = "maml (higher reference)"


def rate(cell: dict[str, Any]) -> float | None:
    """Episodes per second of a training cell (None when it failed)."""
    if not cell or "error" in cell or not cell.get("seconds"):
        return None
    return cell["episodes"] / cell["seconds"]


def mfu(cell: dict[str, Any], peak: float | None) -> float | None:
    if not cell or "error" in cell or not peak or not cell.get("seconds"):
        return None
    return cell["flops"] / cell["seconds"] / peak


def failure(cell: dict[str, Any], width: int = 80) -> str:
    """A cell that did not run to the end: "not run: ..." (a time budget) or "failed: ..."."""
    error = cell["error"].replace("|", "/")
    return error[:width] if error.startswith("not run") else f"failed: {error[:width]}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


# bench labels of second-order MAML set against the reference, as the target rows name them
MAML_VARIANTS = {"maml": "MAML", "maml-ckpt": "MAML, checkpointed inner steps,"}


def maml_targets(name: str, backbone: str, ours: dict, ref: dict) -> list[tuple[str, ...]]:
    """The speed and memory rows of one second-order MAML cell against the reference."""
    speed = ratio(rate(ours), rate(ref))
    mem, measured = None, "n/a"
    if "error" not in ours and "error" not in ref:
        mem = ratio(ours.get("peak_mb"), ref.get("peak_mb"))
        grow = ratio(ours["peak_mb"] - ours["idle_mb"], ref["peak_mb"] - ref["idle_mb"])
        measured = f"{fmt(mem, '.2f', 'x')} of peak ({fmt(grow, '.2f', 'x')} of growth)"
    return [(f"{name} speed >= 1.5x the higher reference", backbone, fmt(speed, ".2f", "x"),
             verdict(speed, 1.5, True)),
            (f"{name} peak memory <= 0.7x the reference", backbone, measured,
             verdict(mem, 0.7, False))]  # fmt: skip


def targets(payload: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, where, measured, verdict) for every target of the benchmark issue."""
    res = payload["results"]
    train, ref, ev = res["train"], res["reference"], res["eval"]
    peak = res.get("matmul_peak", {}).get("flops_per_second")
    rows = []
    for backbone, cell in ref.items():
        for label, name in MAML_VARIANTS.items():
            if f"{backbone}/{label}" in train:
                rows += maml_targets(name, backbone, train[f"{backbone}/{label}"], cell)
    for key, cell in train.items():
        backbone, label = key.split("/", 1)
        if label == "anil":
            anil = ratio(rate(cell), rate(train.get(f"{backbone}/maml", {})))
            rows.append(("ANIL >= 4x MAML episodes/s", backbone, fmt(anil, ".1f", "x"),
                         verdict(anil, 4.0, True)))  # fmt: skip
        if label == "protonet" and backbone == "minilm":  # the target names MiniLM
            util = mfu(cell, peak)
            rows.append(("ProtoNet meta-training MFU >= 50%", backbone,
                         fmt(None if util is None else 100 * util, ".0f", "%"),
                         verdict(util, 0.5, True)))  # fmt: skip
        if label == "maml-lora" and backbone == "bert-base-random":
            mem = None if "error" in cell else cell["peak_mb"] / 1024
            rows.append(("LoRA second-order MAML peak memory < 8 GB", backbone,
                         fmt(mem, ".2f", " GB"), verdict(mem, 8.0, False)))  # fmt: skip
    for key, cell in ev.items():
        backbone, label = key.split("/", 1)
        if label == "protonet" and "error" not in cell:
            cost = cell["eval_seconds"] / cell["one_pass_seconds"]
            rows.append((f"{cell['episodes']}-episode frozen evaluation <= 1.2x one encoding pass",
                         backbone, fmt(cost, ".2f", "x"), verdict(cost, 1.2, False)))  # fmt: skip
    return rows


def training_table(payload: dict[str, Any]) -> list[str]:
    res = payload["results"]
    peak = res.get("matmul_peak", {}).get("flops_per_second")
    cells = dict(res["train"])
    cells |= {f"{b}/{REFERENCE}": c for b, c in res["reference"].items()}
    backbones = list(dict.fromkeys(k.split("/", 1)[0] for k in cells))
    labels = list(dict.fromkeys(k.split("/", 1)[1] for k in cells))
    head = "| algorithm | " + " | ".join(f"{b}: episodes/s | peak MB (growth) | MFU"
                                          for b in backbones) + " |"  # fmt: skip
    lines = [head, "|---|" + "---:|---:|---:|" * len(backbones)]
    for label in labels:
        row = [label]
        for backbone in backbones:
            cell = cells.get(f"{backbone}/{label}", {})
            if "error" in cell:
                row += [failure(cell, 60), "", ""]
                continue
            grow = cell["peak_mb"] - cell["idle_mb"] if cell else None
            util = mfu(cell, peak)
            row += [fmt(rate(cell), ".3g"),
                    f"{fmt(cell.get('peak_mb'), '.0f')} ({fmt(grow, '.0f')})",
                    fmt(None if util is None else 100 * util, ".1f", "%")]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return lines


def eval_table(payload: dict[str, Any]) -> list[str]:
    lines = ["| backbone / algorithm | episodes | distinct texts | one encoding pass (s) | "
             "evaluation (s) | ratio | uncached (s per episode) | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key, cell in payload["results"]["eval"].items():
        if "error" in cell:
            lines.append(f"| {key} | {failure(cell)} |")
            continue
        per_ep = None
        if cell.get("uncached_episodes"):
            per_ep = cell["uncached_seconds"] / cell["uncached_episodes"]
        lines.append(
            f"| {key} | {cell['episodes']} | {cell['distinct_texts']} | "
            f"{cell['one_pass_seconds']:.2f} | {cell['eval_seconds']:.2f} | "
            f"{cell['eval_seconds'] / cell['one_pass_seconds']:.2f}x | {fmt(per_ep, '.3f')} | "
            f"{100 * cell['acc']:.2f}% |"
        )
    return lines


def steps_text(steps: dict[str, int] | int) -> str:
    if isinstance(steps, int):
        return str(steps)
    rest = [f"{n} on {b}" for b, n in steps.items() if b != "*"]
    return ", ".join([f"{steps['*']}", *rest]) if rest else str(steps["*"])


def render(payload: dict[str, Any]) -> str:
    m, res = payload["machine"], payload["results"]
    peak = res.get("matmul_peak", {})
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads)"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; device {m['device']}, precision {m['precision']}; torch {m['torch']}, "
        f"Python {m['python']}. Command: `{payload['command']}` ({payload['warmup']} warm-up "
        f"step, then measured outer steps of 2 episodes per cell: {steps_text(payload['steps'])}; "
        f"{payload['wall_seconds'] / 60:.0f} minutes in all).",
        "",
        f"Measured matmul peak: {fmt(peak.get('flops_per_second', 0) / 1e9, '.1f')} GFLOP/s "
        f"({peak.get('dtype')}, {peak.get('n')}x{peak.get('n')}, best of {peak.get('repeats')}).",
        "",
        "| target | backbone | measured | verdict |",
        "|---|---|---|---|",
        *[f"| {t} | {b} | {v} | {ok} |" for t, b, v, ok in targets(payload)],
        "",
        "Meta-training, 5-way 5-shot, 5 queries per class, 5 inner steps:",
        "",
        *training_table(payload),
        "",
        "Evaluation of a frozen encoder:",
        "",
        *eval_table(payload),
    ]
    return "\n".join(lines)
