"""The summary of a `scripts/gpu_check.sh` folder: gpu-check.json and a table on stdout.

    python scripts/gpu_summary.py outputs/gpu-check-<date>-<time>

Exit code 0 when every step that ran passed, 1 otherwise (a skipped step says why).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from bench import cpu_name  # scripts/ is on the path of a script run from it

TIMED_OUT = {"124", "137"}  # timeout(1): the limit, or the kill after it


def read_steps(folder: Path) -> list[dict[str, Any]]:
    steps = []
    for line in (folder / "steps.tsv").read_text().splitlines():
        name, rc, seconds, *why = line.split("\t")
        status = "skipped" if rc == "skipped" else "passed" if rc == "0" else "failed"
        if rc in TIMED_OUT:
            status = "timed out"
        log = folder / f"{name}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        steps.append({"step": name, "status": status, "exit_code": rc, "seconds": int(seconds),
                      "note": why[0] if why else (tail[0][:200] if tail else "")})  # fmt: skip
    return steps


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def run_result(run: Path) -> dict[str, Any] | None:
    """The few numbers of a run folder's summary.json that say it worked."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    test = s.get("test") or {}
    return {"status": s.get("status"), "test_acc": test.get("acc"),
            "test_ci95": test.get("acc_ci95"), "episodes": test.get("episodes"),
            "wall_seconds": s.get("wall_seconds"), "peak_memory_mb": s.get("peak_memory_mb"),
            "processes": s.get("processes"), "device": s.get("device"),
            "error": s.get("error")}  # fmt: skip


def main(folder: Path) -> int:
    steps = read_steps(folder)
    payload = {"machine": machine(), "steps": steps,
               "protocol": run_result(folder / "protocol"),
               "torchrun_nccl": run_result(folder / "ddp")}  # fmt: skip
    (folder / "gpu-check.json").write_text(json.dumps(payload, indent=2) + "\n")
    width = max(len(s["step"]) for s in steps)
    m = payload["machine"]
    print(f"GPU check: {m.get('gpu', 'no GPU')} ({m['cpu']}), torch {m['torch']}")
    for s in steps:
        print(f"  {s['step']:<{width}}  {s['status']:<9} {s['seconds']:>4} s  {s['note']}")
    if payload["protocol"]:
        p = payload["protocol"]
        print(f"  protocol run: {p['status']}, test accuracy {p['test_acc']} ± {p['test_ci95']}, "
              f"{p['wall_seconds']} s")  # fmt: skip
    print(f"wrote {folder / 'gpu-check.json'}")
    return 0 if all(s["status"] in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
