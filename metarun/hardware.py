"""Where a run computes: the device, mixed precision, threads, the process group, seeding."""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metarun.config import HardwareConfig
from metarun.distributed import Dist, init_distributed
from metarun.errors import MetarunError

# `hardware.precision=auto` computes in bf16 on bf16 hardware from this backbone size on: on an
# AVX512-BF16 CPU a MiniLM (22.7M) training step runs 1.6x faster and a SmolLM2 LoRA episode
# 1.3-1.4x, a 1M-parameter test model only 1.1x (docs/BENCHMARKS.md, "bf16 on the CPU").
BF16_MIN_PARAMS = 10_000_000
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # the CPU flags of bf16 matrix instructions


@dataclass
class Hardware:
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast, or nothing
    dist: Dist
    requested: str = "fp32"  # hardware.precision: fp32, bf16 or auto (chosen once loaded)
    precision: str = "fp32"  # what the run computes in
    reason: str = "hardware.precision=fp32"

    def use(self, precision: str, reason: str) -> None:
        self.precision, self.reason = precision, reason
        self.autocast = autocast_factory(self.device, precision)

    def facts(self) -> dict[str, str]:
        """What summary.json says of the precision: asked, used and why."""
        return {"requested": self.requested, "used": self.precision, "why": self.reason}


def setup_hardware(hw: HardwareConfig) -> Hardware:
    """The device, an autocast factory and the process group; fails early when the device is
    not there. Under torchrun with `distributed`, "cuda" means this process's GPU."""
    try:
        device = torch.device(hw.device)
    except RuntimeError as err:
        raise MetarunError(f"hardware.device={hw.device} is not a device name") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetarunError(
            f"hardware.device={hw.device} but no CUDA GPU is visible; use hardware=cpu"
        )
    dist = Dist()
    if hw.distributed:
        dist, local_rank = init_distributed(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    if hw.threads > 0:
        torch.set_num_threads(hw.threads)
    torch.set_float32_matmul_precision("high" if hw.tf32 else "highest")
    hardware = Hardware(device, contextlib.nullcontext, dist, requested=hw.precision)
    # `auto` computes in fp32 until the backbone is known (choose_precision)
    hardware.use("fp32" if hw.precision == "auto" else hw.precision,
                 f"hardware.precision={hw.precision}")  # fmt: skip
    return hardware


def autocast_factory(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix instructions that oneDNN uses (AMX-BF16, AVX512-BF16); none on
    CPUs without them, where bf16 math is emulated and slower than fp32."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except AttributeError:  # an older torch: the kernel's own flags
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            return []
        caps = {name: name in flags for name in BF16_UNITS}
    return [name for name in BF16_UNITS if caps.get(name)]


def choose_precision(hw: Hardware, params: int, inner_weights: list[str]) -> str | None:
    """`hardware.precision=auto`, once the model is built: bf16 on a GPU that has it and on a
    CPU with bf16 units, for a backbone of BF16_MIN_PARAMS or more whose inner loop (if any)
    adapts no backbone weight but LoRA's; fp32 elsewhere. `inner_weights`: the backbone
    weights (not LoRA factors) an inner loop adapts. Returns a warning for an explicit bf16
    that would hide those inner steps, None otherwise."""
    hidden = (
        f"an inner loop adapts {len(inner_weights)} backbone weights (e.g. {inner_weights[0]}), "
        "whose steps (~1e-6 relative) are below bf16's resolution (4e-3): the adapted "
        "forward barely changes"
    ) if inner_weights else None  # fmt: skip
    if hw.requested != "auto":
        return hidden if hw.requested == "bf16" else None
    size = f"{params / 1e6:.1f}M-parameter backbone"
    if hw.device.type == "cuda":
        units = ["the GPU's bf16"] if torch.cuda.is_bf16_supported() else []
    else:
        units = cpu_bf16_units() if hw.device.type == "cpu" else []
    if not units:
        hw.use("fp32", f"auto: no bf16 units on {hw.device.type}")
    elif hidden:
        hw.use("fp32", f"auto: fp32 because {hidden} in bf16")
    elif params < BF16_MIN_PARAMS:
        hw.use("fp32", f"auto: a {size} gains too little from bf16")
    else:
        hw.use("bf16", f"auto: bf16 ({', '.join(units)}) for a {size}")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
