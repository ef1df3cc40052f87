"""Where a run computes: the device, mixed precision, threads, the process group, seeding."""

from __future__ import annotations

import contextlib
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from metarun.config import HardwareConfig
from metarun.distributed import Dist, init_distributed
from metarun.errors import MetarunError


@dataclass
class Hardware:
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast, or nothing
    dist: Dist


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
    if hw.precision == "bf16":
        return Hardware(device, lambda: torch.autocast(device.type, dtype=torch.bfloat16), dist)
    return Hardware(device, contextlib.nullcontext, dist)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
