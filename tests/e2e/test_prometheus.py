"""A real Prometheus scrapes a real server process and its queries see what was sent."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests.images import jpeg
from tests.prometheus import query, running_prometheus
from tests.served import served


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run `sudo scripts/install-system-deps.sh` (Debian package "
                    "`prometheus`)")
    return path


def test_prometheus_scrapes_the_server(tmp_path, prometheus_binary):
    with served(tmp_path, env={"PALIGEMMA_DEFAULT_MAX_NEW_TOKENS": "3"}) as server:
        for seed in range(3):
            response = httpx.post(f"{server.url}/v1/caption",
                                  files={"image": ("a.jpg", jpeg(64, 48, seed=seed), "image/jpeg")}, timeout=60)
            assert response.status_code == 200
        assert httpx.post(f"{server.url}/v1/vqa", files={"image": ("a.jpg", jpeg(), "image/jpeg")},
                          timeout=60).status_code == 422

        target = server.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: paligemma\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        with running_prometheus(prometheus_binary, config, tmp_path) as url:
            deadline = time.monotonic() + 60
            results: list[dict] = []
            while time.monotonic() < deadline:  # the first scrape comes a scrape interval after the start
                results = query(url, 'paligemma_requests_total{endpoint="/v1/caption",status="200"}')
                if results:
                    break
                time.sleep(0.5)
            assert results, (tmp_path / "prometheus.log").read_text()
            assert float(results[0]["value"][1]) == 3
            [up] = query(url, 'up{job="paligemma"}')
            assert up["value"][1] == "1"
            [rejected] = query(url, 'paligemma_requests_total{endpoint="/v1/vqa",status="422"}')
            assert float(rejected["value"][1]) == 1
            [info] = query(url, "paligemma_model_info")
            assert info["metric"]["model"] == "tiny" and info["metric"]["random_weights"] == "true"
            [prefilled] = query(url, 'paligemma_step_rows_sum{phase="prefill"}')
            assert float(prefilled["value"][1]) == 6 + 3  # the warm-up's task paths and three captions
            [memory] = query(url, 'process_resident_memory_bytes{job="paligemma"}')
            assert float(memory["value"][1]) > 10 * 1024 * 1024
