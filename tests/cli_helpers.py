"""Running the `metarun` command as a user would, and reading what a run leaves behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FAST = [  # a few seconds end to end: tiny random BERT on the synthetic topics
    "backbone=tiny",
    "task=local",
    "task.way=3",
    "task.shots=2",
    "task.queries=2",
    "task.class_split=[0.5,0.25,0.25]",
    "task.val_episodes=4",
    "task.test_episodes=10",
    "train.steps=4",
    "train.val_interval=2",
    "logger.progress=false",
]


def metarun(*args: str, cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("metarun")
    cmd = [exe] if exe else [sys.executable, "-m", "metarun"]
    full_env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"} | env
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "outputs").rglob("summary.json"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Records of an offline `.wandb` file (a LevelDB-style log of protobuf records)."""
    data, pos, buf = path.read_bytes(), 7, b""  # 7-byte W&B file header
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:  # block trailer padding
            pos += space
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)
