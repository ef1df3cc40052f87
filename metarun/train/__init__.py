"""Training and evaluation: the outer loop (trainer.py), what one step computes (batches.py),
what a run has done so far (progress.py, saved for resume), few-shot evaluation over fixed
episodes (evaluate.py) and the supervised contrastive stage (contrastive.py)."""

from metarun.train.batches import Runtime
from metarun.train.evaluate import EvalResult, evaluate
from metarun.train.trainer import Checkpoints, Episodes, FitResult, Trainer

__all__ = ["Checkpoints", "Episodes", "EvalResult", "FitResult", "Runtime", "Trainer", "evaluate"]
