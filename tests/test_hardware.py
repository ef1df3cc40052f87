"""Device set-up: clear errors for missing hardware, bf16 autocast where asked."""

from __future__ import annotations

import pytest
import torch

from metarun.config import HardwareConfig
from metarun.errors import MetarunError
from metarun.experiment import setup_hardware


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(MetarunError, match="use hardware=cpu"):
        setup_hardware(HardwareConfig(device="cuda", precision="bf16"))


def test_bad_values_name_their_key():
    with pytest.raises(MetarunError, match=r"hardware\.precision=fp8"):
        setup_hardware(HardwareConfig(precision="fp8"))
    with pytest.raises(MetarunError, match=r"hardware\.device=gpu0"):
        setup_hardware(HardwareConfig(device="gpu0"))


def test_bf16_autocast_lowers_matmul_precision():
    device, autocast, _ = setup_hardware(HardwareConfig(precision="bf16"))
    a = torch.randn(8, 8, device=device)
    with autocast():
        assert (a @ a).dtype == torch.bfloat16
    _, plain, _ = setup_hardware(HardwareConfig())
    with plain():
        assert (a @ a).dtype == torch.float32


def test_distributed_without_torchrun_names_the_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MetarunError, match="torchrun --nproc_per_node N -m metarun hardware=ddp"):
        setup_hardware(HardwareConfig(distributed=True))
