"""A trained run reused: its weights as the start of another run (`init_from`, e.g. meta-train
on BANKING77 and test on CLINC150) or to label new texts (`metarun-predict`).

The source run's checkpoint.pt holds the trainable parameters at its best validation step; the
frozen rest comes back from the backbone config, which must therefore be the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from metarun.algo import Algorithm
from metarun.errors import MetarunError
from metarun.rundir.files import load_checkpoint

log = logging.getLogger("metarun")
# What must agree for weights to mean the same thing: the model and the algorithm's class.
SAME_MODEL = ("backbone.path", "backbone.gguf_file", "backbone.random_init", "backbone.arch",
              "backbone.lora_targets", "algo._target_")  # fmt: skip


def source_config(folder: Path, key: str = "init_from") -> dict[str, Any]:
    if not folder.is_dir():
        raise MetarunError(f"{key}={folder} is not a folder; give a metarun run folder")
    path = folder / "config.yaml"
    if not path.is_file():
        raise MetarunError(f"{key}={folder} has no config.yaml; is it a metarun run folder?")
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(config, dict)
    return config


def pick(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_same_model(source: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    """Refuse weights of another backbone or algorithm, naming what differs."""
    for key in SAME_MODEL:
        if pick(source, key) != pick(now, key):
            what = "backbone" if key.startswith("backbone") else "algorithm"
            raise MetarunError(
                f"init_from={folder} was trained with another {what} ({key}: "
                f"{pick(source, key)!r}, here {pick(now, key)!r}); use the same backbone and "
                "algo options as that run"
            )


def load_trained(algo: Algorithm, folder: Path, key: str = "init_from") -> dict[str, Any]:
    """Load the run's best weights into `algo`; returns what to record about the source.

    Parameters whose shape depends on the training task (fine-tuning's classifier over the
    meta-train classes) are left as built, and named in the log; any other mismatch is an
    error."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        raise MetarunError(
            f"{key}={folder} has no checkpoint.pt (a train.steps=0 run, or "
            "train.save_checkpoint=false): it has no trained weights to reuse"
        )
    advice = "choose another run folder, or rerun that run to write its weights again"
    state = load_checkpoint(path, advice)["trainable_state"]
    own = dict(algo.named_parameters())
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise MetarunError(
            f"{key}={folder}: its weights do not fit this algorithm's ({', '.join(unknown[:3])}); "
            "use the algo options of that run"
        )
    skipped = sorted(k for k, v in state.items() if own[k].shape != v.shape)
    if skipped:
        log.info("%s: not loaded, their shape depends on the training task: %s", key,
                 ", ".join(skipped))  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            if name not in skipped:
                own[name].copy_(value.to(own[name].dtype))
    log.info("%s: loaded %d tensors from %s", key, len(state) - len(skipped), path)
    return {"run": str(folder), "checkpoint": str(path), "skipped": skipped}
