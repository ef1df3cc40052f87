"""The built wheel carries its configs: installed in a fresh venv, it runs from any directory."""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
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


def running_env_venv(venv: Path) -> Path:
    """A venv whose dependencies are those of the interpreter running the tests, whether that
    is a system Python or itself a venv (`--system-site-packages` would give a venv's base
    interpreter's packages instead): a .pth file lists the running environment's site folders,
    after the new venv's own, so metarun comes from the wheel installed there."""
    _run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    folders = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                             *site.getsitepackages()])  # fmt: skip
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = Path(_run(venv / "bin" / "python", "-c", probe, cwd=venv.parent).stdout.strip())
    (own / "running_env.pth").write_text("".join(f"{f}\n" for f in folders))
    return venv


def test_wheel_in_a_fresh_venv_finds_its_configs(tmp_path):
    dist, elsewhere = tmp_path / "dist", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", dist, REPO, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("metarun-*.whl")
    venv = running_env_venv(tmp_path / "venv")
    _run(venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    where = _run(venv / "bin" / "python", "-c", "import metarun; print(metarun.__file__)",
                 cwd=elsewhere).stdout  # fmt: skip
    assert where.startswith(str(venv))
    job = _run(venv / "bin" / "metarun", "--cfg", "job", "algo=protonet", "task=banking77",
               cwd=elsewhere)  # fmt: skip
    assert "path: PolyAI/banking77" in job.stdout and "_target_: metarun.algo" in job.stdout
    bad = _run(venv / "bin" / "metarun", "backbone=nope", cwd=elsewhere, check=False)
    assert bad.returncode == 2 and "Available options in 'backbone'" in bad.stderr
