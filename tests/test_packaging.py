"""The built wheel carries its configs: installed in a fresh venv, it runs from any directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 or not check, proc.stderr
    return proc


def test_wheel_in_a_fresh_venv_finds_its_configs(tmp_path):
    dist, elsewhere = tmp_path / "dist", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", dist, REPO, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("metarun-*.whl")
    venv = tmp_path / "venv"  # dependencies come from the system site; metarun from the wheel
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    _run(venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    where = _run(venv / "bin" / "python", "-c", "import metarun; print(metarun.__file__)",
                 cwd=elsewhere).stdout  # fmt: skip
    assert where.startswith(str(venv))
    job = _run(venv / "bin" / "metarun", "--cfg", "job", "algo=protonet", "task=banking77",
               cwd=elsewhere)  # fmt: skip
    assert "path: PolyAI/banking77" in job.stdout and "_target_: metarun.algo" in job.stdout
    bad = _run(venv / "bin" / "metarun", "backbone=nope", cwd=elsewhere, check=False)
    assert bad.returncode == 2 and "Available options in 'backbone'" in bad.stderr
