"""deploy/prometheus and deploy/grafana: the metric contract between the server, the dashboard and the
alerts, promtool, and the alerts firing under every scrape set-up's labels."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from deploy.checks import dashboard, live, promql
from deploy.checks.files import ALERTS, DASHBOARD, JOB, PROMETHEUS, SERVICE_MONITOR, load_yaml
from deploy.checks.kubernetes_extras import servicemonitor_job
from deploy.checks.prometheus import check_prometheus_config, k8s_scrape_config_for_promtool
from deploy.checks.tools import run as run_tool
from tests.deployment.tooling import require_tool, run
from tests.prometheus import query, running_prometheus


def test_prometheus_scrapes_the_compose_service_as_the_alerts_job(compose):
    assert check_prometheus_config(compose["base"]) == []


def test_dashboard_uses_exactly_the_server_metrics():
    assert dashboard.check_dashboard() == []


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(dashboard.promql_rules())
    result = run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_check_catches_an_unknown_metric(tmp_path):
    board = json.loads(DASHBOARD.read_text())
    board["panels"][1]["targets"][0]["expr"] = "sum(paligemma_request_total)"
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(board))
    assert any("unknown metric 'paligemma_request_total'" in p for p in dashboard.check_dashboard(broken))


def test_metric_contract_matches_the_server():
    # The names the dashboard and alerts rely on are the ones app/metrics.py exposes.
    from app.metrics import Metrics

    assert live.check_exposition(Metrics().render().decode()) == []


def test_the_standard_process_series_are_checked_beside_the_contract(tmp_path):
    from app.metrics import Metrics

    assert "process_resident_memory_bytes" in promql.STANDARD and "python_info" in promql.STANDARD
    text = Metrics().render().decode()
    without = "\n".join(line for line in text.splitlines() if "process_resident_memory_bytes" not in line)
    assert live.check_exposition(without) == ["/metrics does not declare process_resident_memory_bytes"]
    # Queries may use them; a misspelt one is caught like a misspelt paligemma_* one.
    assert promql.check_expressions([("q", "rate(process_cpu_seconds_total[1m]) + on(instance) python_info")]) == []
    board = json.loads(DASHBOARD.read_text())
    panel = next(p for p in board["panels"] if p["title"] == "Resident memory")
    panel["targets"][0]["expr"] = "process_resident_memory_byte"
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(board))
    assert any("unknown metric 'process_resident_memory_byte'" in p for p in dashboard.check_dashboard(broken))


def test_metric_name_extraction_ignores_strings_and_labels():
    expr = 'sum by (endpoint) (rate(paligemma_requests_total{job="paligemma_x", status=~"5.."}[5m]))'
    assert promql.metric_names(expr) == {"paligemma_requests_total"}
    assert promql.label_names(expr) == {"endpoint", "job", "status"}


# ------------------------------------------------------------------------------ alerts per scrape set-up
def _prometheus_up_labels(tmp_path: Path, config_text: str) -> dict[str, str]:
    """Run a real Prometheus on `config_text` and return the labels of the `up` series it makes."""
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text)
    with running_prometheus(require_tool("prometheus"), config, tmp_path) as url:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the first scrape comes a scrape interval after the start
            series = query(url, "up")
            if series:
                return series[0]["metric"]
            time.sleep(0.5)
        raise AssertionError((tmp_path / "prometheus.log").read_text())


def test_a_prometheus_that_is_still_starting_is_waited_for(tmp_path, monkeypatch):
    # Prometheus answers 503 in plain text until its storage is open; the helper must wait, not fail.
    launcher = tmp_path / "prometheus"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name('starting_prometheus.py')} \"$@\"\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys.modules[__name__], "require_tool", lambda name: str(launcher))
    labels = _prometheus_up_labels(tmp_path, "scrape_configs: []\n")
    assert labels["job"] == "paligemma-server"


def _alert_fires_for(promtool: str, tmp_path: Path, labels: dict[str, str]) -> tuple[int, str]:
    """promtool: does PaligemmaDown fire for a target with these labels that stops answering?"""
    selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    test = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": f"up{{{selector}}}", "values": "0x6"}],
        "alert_rule_test": [{"eval_time": "5m", "alertname": "PaligemmaDown", "exp_alerts": [{
            "exp_labels": {**{k: v for k, v in labels.items() if k != "__name__"}, "severity": "critical"},
            "exp_annotations": {"summary": f"PaliGemma server {labels['instance']} cannot be scraped"}}]}]}]}
    path = tmp_path / "down.test.yml"
    path.write_text(yaml.safe_dump(test))
    return run_tool([promtool, "test", "rules", path])


def test_down_alert_fires_under_the_kubernetes_scrape_example(promtool, rendered, tmp_path):
    # What kubernetes_sd would attach to the Deployment's pod, from the rendered manifests; a real
    # Prometheus applies the example's relabelling to it (the target, on loopback, is down).
    pod = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["metadata"]
    meta = {"__meta_kubernetes_namespace": "paligemma", "__meta_kubernetes_pod_name": "paligemma-server-0"}
    meta |= {"__meta_kubernetes_pod_annotation_" + k.replace(".", "_").replace("/", "_"): v
             for k, v in pod["annotations"].items()}
    meta |= {"__meta_kubernetes_pod_label_" + k.replace(".", "_").replace("/", "_"): v
             for k, v in pod["labels"].items()}
    text, problems = k8s_scrape_config_for_promtool(target="127.0.0.2:1", meta=meta)
    assert problems == []
    labels = _prometheus_up_labels(tmp_path, text.replace("scrape_interval: 15s", "scrape_interval: 1s"))
    assert labels["job"] == JOB and labels["instance"] == "127.0.0.2:8000"
    code, out = _alert_fires_for(promtool, tmp_path, labels)
    assert code == 0, out


def test_down_alert_fires_under_the_servicemonitor_and_compose(promtool, rendered, tmp_path):
    service = next(d for d in rendered if d["kind"] == "Service")
    job = servicemonitor_job(load_yaml(SERVICE_MONITOR), service)
    code, out = _alert_fires_for(promtool, tmp_path, {"job": job, "instance": "10.0.0.7:8000",
                                                      "namespace": "paligemma", "pod": "paligemma-server-0"})
    assert code == 0, out
    compose_job = load_yaml(PROMETHEUS)["scrape_configs"][0]["job_name"]
    code, out = _alert_fires_for(promtool, tmp_path, {"job": compose_job, "instance": "paligemma:8000"})
    assert code == 0, out
    code, out = _alert_fires_for(promtool, tmp_path, {"job": "paligemma", "instance": "paligemma:8000"})
    assert code != 0, "a job the alerts do not match must not pass"
