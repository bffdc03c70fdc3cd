"""PALIGEMMA_DEVICE: a GPU asked for and not usable stops start-up with the reason; `auto` falls back to
the CPU loudly when the machine has NVIDIA devices that CUDA cannot use.

The device nodes are looked up under a root directory, so a temporary folder stands in for a GPU host's
/dev and /proc; what torch says about CUDA is the real answer of the torch installed here. A served
process asked for CUDA: tests/e2e/test_startup_errors.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from app.model.loader import DeviceUnavailable, nvidia_devices, resolve_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these cases need a machine whose CUDA "
                                "is unusable; this one has a working GPU")


@pytest.fixture
def gpu_host(tmp_path):
    """A root with the device nodes and driver folder an NVIDIA host (or a GPU container) has."""
    (tmp_path / "dev").mkdir()
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    return tmp_path


def test_nvidia_devices_finds_gpus_not_control_nodes(gpu_host, tmp_path_factory):
    assert nvidia_devices(gpu_host) == [str(gpu_host / "dev/nvidia0"), str(gpu_host / "proc/driver/nvidia")]
    assert nvidia_devices(tmp_path_factory.mktemp("empty")) == []


def test_auto_without_nvidia_devices_is_the_cpu_quietly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="app.model.loader"):
        assert resolve_device("auto", root=tmp_path) == torch.device("cpu")
    assert caplog.records == []


def test_auto_on_a_gpu_host_whose_cuda_is_unusable_warns(gpu_host, caplog):
    with caplog.at_level(logging.WARNING, logger="app.model.loader"):
        assert resolve_device("auto", root=gpu_host) == torch.device("cpu")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "FALLING BACK TO THE CPU" in message
    assert str(gpu_host / "dev/nvidia0") in message
    # The reason is torch's own: here a CPU build.
    assert f"this torch ({torch.__version__}) is a CPU build" in message
    assert "PALIGEMMA_DEVICE=cuda" in message


@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_a_usable_gpu_is_an_error_that_says_why(setting, tmp_path):
    with pytest.raises(DeviceUnavailable) as raised:
        resolve_device(setting, root=tmp_path)
    message = str(raised.value)
    assert message.startswith(f"PALIGEMMA_DEVICE={setting} but no GPU can be used")
    assert "no NVIDIA device is visible to this process" in message
    assert "CPU build" in message and "PALIGEMMA_DEVICE=cpu (or auto) for the CPU" in message


def test_cuda_error_names_the_devices_it_found(gpu_host):
    with pytest.raises(DeviceUnavailable, match=r"NVIDIA devices present: .*dev/nvidia0"):
        resolve_device("cuda", root=gpu_host)


def test_cpu_is_taken_as_asked(gpu_host):
    assert resolve_device("cpu", root=gpu_host) == torch.device("cpu")
