"""What a training run has done so far, saved in last.pt and restored on resume: one field list
for both, so a new field cannot be saved and forgotten on load (or the reverse).

Random states are part of it: a resumed run draws exactly the random numbers the uninterrupted
run would have drawn (Python's, NumPy's global, torch's CPU and CUDA generators; the samplers'
own generators are saved beside them). Everything is stored as tensors and plain Python values,
so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Progress:
    step: int = 0  # the last step taken (steps count from 1)
    best_state: dict[str, torch.Tensor] | None = None  # trainable weights at the best validation
    best_acc: float | None = None
    best_step: int | None = None
    waited: int = 0  # validations without improvement (train.patience)
    seconds: float = 0.0  # training time, validation excluded
    episodic_seconds: float = 0.0  # the episodic steps' share of `seconds` (episodes/s)
    stopped: bool = False  # early stop
    saved_checkpoint: bool = False  # checkpoint.pt written

    def as_state(self) -> dict[str, Any]:
        """The fields as plain values (shallow: weights are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """From a saved state; one written before `episodic_seconds` existed counts every
        second as episodic, as it then was."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in fields}
        values.setdefault("episodic_seconds", state["seconds"])
        return cls(**values)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"])
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
