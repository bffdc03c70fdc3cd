"""A served process given a model (or a device) it cannot load exits 1 with one message and no traceback.

No network: a local directory that does not exist, and a made-up hub id under HF_HUB_OFFLINE=1 with an
empty hub cache.
"""

from __future__ import annotations

import pytest
import torch

from tests.served import served


def _failed_start(tmp_path, env: dict[str, str]) -> str:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), **env}
    with served(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=120) == 1
    return server.log()


def _check(log: str, first_line: str) -> None:
    assert "Traceback" not in log, log
    assert log.count("PALIGEMMA_MODEL=") == 1, log  # the message once (its first line names the variable)
    exit_line = next(line for line in log.splitlines() if "exiting: start-up failed: " in line)
    assert exit_line.endswith(f"exiting: start-up failed: {first_line}"), log
    assert "  - a built-in preset with random weights: tiny, " in log
    assert "gated ones need their licence accepted and HF_TOKEN set" in log


def test_a_local_directory_that_does_not_exist(tmp_path):
    missing = tmp_path / "models" / "paligemma2-3b-mix-224"
    log = _failed_start(tmp_path, {"PALIGEMMA_MODEL": str(missing)})
    _check(log, f"PALIGEMMA_MODEL={str(missing)!r} cannot be loaded: there is no directory at {missing}.")


def test_a_hub_id_that_is_not_in_the_cache_in_offline_mode(tmp_path):
    log = _failed_start(tmp_path, {"PALIGEMMA_MODEL": "made-up-org/no-such-paligemma"})
    _check(log, "PALIGEMMA_MODEL='made-up-org/no-such-paligemma' cannot be loaded: HF_HUB_OFFLINE=1 and "
                "made-up-org/no-such-paligemma is not in the hub cache (HF_HOME): download it once with "
                "network access (e.g. `hf download made-up-org/no-such-paligemma`), or set PALIGEMMA_MODEL "
                "to a local directory.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose CUDA is unusable")
def test_served_process_with_cuda_asked_exits_1_with_the_reason(tmp_path):
    with served(tmp_path, env={"PALIGEMMA_DEVICE": "cuda"}, ready=False) as server:
        assert server.process.wait(timeout=120) == 1
        log = server.log()
    assert "PALIGEMMA_DEVICE=cuda but no GPU can be used" in log
    assert "exiting: start-up failed: PALIGEMMA_DEVICE=cuda" in log
