"""Device set-up: clear errors for missing hardware, bf16 autocast where asked."""

from __future__ import annotations

import pytest
import torch

from metarun.checks import check_config
from metarun.config import HardwareConfig
from metarun.errors import MetarunError
from metarun.hardware import setup_hardware


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(MetarunError, match="use hardware=cpu"):
        setup_hardware(HardwareConfig(device="cuda", precision="bf16"))


def test_bad_values_name_their_key(compose_cfg):
    with pytest.raises(MetarunError, match=r"hardware\.precision=fp8; use one of auto, fp32, bf16"):
        check_config(compose_cfg("hardware.precision=fp8"))  # before anything loads
    with pytest.raises(MetarunError, match=r"hardware\.device=gpu0"):
        setup_hardware(HardwareConfig(device="gpu0"))


def test_bf16_autocast_lowers_matmul_precision():
    hw = setup_hardware(HardwareConfig(precision="bf16"))
    a = torch.randn(8, 8, device=hw.device)
    with hw.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with setup_hardware(HardwareConfig()).autocast():
        assert (a @ a).dtype == torch.float32


def test_distributed_without_torchrun_names_the_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MetarunError, match="torchrun --nproc_per_node N -m metarun hardware=ddp"):
        setup_hardware(HardwareConfig(distributed=True))
