"""What makes a run folder self-contained: resolved config, versions, commit, atomic files."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from metarun.errors import MetarunError, os_error_in

PACKAGES = (
    "metarun",
    "torch",
    "transformers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "peft",
    "wandb",
    "numpy",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str | None:
    """The commit of the metarun source tree, with '-dirty' if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # an installed wheel has no repository: its version identifies the code
    return head + ("-dirty" if dirty else "")


def finite(data: Any) -> Any:
    """NaN and infinities as null: bare `NaN` is not JSON, and most readers refuse it."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


@contextmanager
def atomic(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write via a temporary file, flushed to disk, then renamed over `path`: a kill at any
    moment leaves the old file or the new one, and a failed write (a full disk) leaves no
    temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open(mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = os_error_in(err)  # torch.save's RuntimeError carries it as its cause
        if cause is not None and cause.filename is None:
            cause.filename = str(path)  # a full disk's error names no file: name the one we wrote
        raise


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n"
    with atomic(path) as f:
        f.write(text)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic(path, "wb") as f:
        import torch  # here, not at the top: the CLI's early checks never need it

        torch.save(payload, f)


RESUME_ADVICE = ("resume from another run folder, or start afresh with run_dir_mode=overwrite "
                 "(or another run_dir)")  # fmt: skip


def load_checkpoint(path: Path, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """A checkpoint's contents; a truncated or foreign file is one line saying what to do
    (`advice`: resuming a run and reusing its weights call for different fixes)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MetarunError(f"{path} does not exist") from None
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise MetarunError(
            f"{path} is not a readable metarun checkpoint ({type(err).__name__}; truncated or "
            f"written by something else); {advice}"
        ) from None
