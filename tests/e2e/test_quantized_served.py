"""Quantized serving against a served process, the start-up memory plan it logs, and its refusal to start
when the model cannot fit (PALIGEMMA_MEMORY stands for a smaller device on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.images import jpeg
from tests.served import ROOT, served


def _within(measured: int, planned: int, tolerance: float = 0.05) -> bool:
    return abs(measured - planned) <= tolerance * planned


@pytest.mark.parametrize(("preset", "method"), [("tiny", "int8"), ("tiny-gemma2", "nf4")])
def test_quantized_model_serves_and_reports_itself(tmp_path, preset, method):
    env = {"PALIGEMMA_MODEL": preset, "PALIGEMMA_QUANTIZATION": method, "PALIGEMMA_MAX_BATCH_SIZE": "4",
           "PALIGEMMA_MEMORY": "8GiB"}
    with served(tmp_path, env=env) as server:
        image = {"image": ("a.jpg", jpeg(), "image/jpeg")}
        caption = httpx.post(f"{server.url}/v1/caption", files=image, data={"max_new_tokens": "6"}, timeout=60)
        detect = httpx.post(f"{server.url}/v1/detect", files=image, data={"objects": "cat"}, timeout=60)
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        log = server.log()
        assert server.terminate() == 0
    assert caption.status_code == 200 and caption.json()["usage"]["completion_tokens"] >= 1
    assert detect.status_code == 200
    assert card["quantization"] == method
    assert card["vision_quantized"] is False  # the default keeps the vision tower in the dtype
    plan = card["memory_plan"]
    assert plan["quantization"] == method and plan["fits"] is True and plan["memory_bytes"] == 8 * 2**30
    # What start-up measured agrees with what the plan said before loading.
    assert _within(card["weight_bytes"], plan["weight_bytes"])
    assert _within(card["kv_cache_bytes"], plan["kv_cache_bytes"])
    assert plan["rows_that_fit"] == card["max_batch_size"] == 4
    assert "memory plan (PALIGEMMA_MEMORY):" in log and "memory: weights" in log


def test_the_vision_tower_is_quantized_only_when_asked(tmp_path):
    env = {"PALIGEMMA_QUANTIZATION": "int8", "PALIGEMMA_QUANTIZE_VISION": "true"}
    with served(tmp_path, env=env) as server:
        ok = httpx.post(f"{server.url}/v1/caption", files={"image": ("a.jpg", jpeg(), "image/jpeg")},
                        data={"max_new_tokens": "4"}, timeout=60)
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert ok.status_code == 200
    assert card["vision_quantized"] is True and card["memory_plan"]["quantize_vision"] is True
    assert _within(card["weight_bytes"], card["memory_plan"]["weight_bytes"])


def test_start_up_refuses_with_the_plan_when_the_model_cannot_fit(tmp_path):
    env = {"PALIGEMMA_MODEL": "bench", "PALIGEMMA_MEMORY": "64MiB"}
    with served(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=120) == 1
        log = server.log()
    assert "Traceback" not in log, log
    assert "start-up failed: bench does not fit in 64.0 MiB (PALIGEMMA_MEMORY): the weights alone" in log
    assert "weights" in log and "rows that fit" in log and "fits" in log  # the table
    assert "PALIGEMMA_QUANTIZATION=int8 or nf4" in log
    assert "loaded bench" not in log  # refused before any weight was loaded


def test_the_plan_command_as_a_process():
    result = subprocess.run([sys.executable, "-m", "app", "plan", "--model", "google/paligemma2-3b-mix-448",
                             "--memory", "16GiB", "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(result.stdout)
    assert document["fits"] is True and document["image_tokens"] == 1024
    assert document["adapter_slots"] == 0 and document["adapter_bytes"] == 0  # none configured
    assert "Failed to load" not in result.stderr  # optional libraries' import noise (app.__main__)
    # Adapters configured in the environment: their slots are counted, and leave fewer KV cache rows.
    with_adapters = subprocess.run(
        [sys.executable, "-m", "app", "plan", "--model", "google/paligemma2-3b-mix-448", "--memory", "16GiB",
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PALIGEMMA_ADAPTER_ROOT": str(ROOT),
             "PALIGEMMA_MAX_ADAPTERS": "4", "PALIGEMMA_MAX_LORA_RANK": "64"})
    assert with_adapters.returncode == 0, with_adapters.stderr[-2000:]
    counted = json.loads(with_adapters.stdout)
    assert counted["adapter_slots"] == 5 and counted["adapter_bytes"] > 2**30
    assert counted["rows_that_fit"] < document["rows_that_fit"]
