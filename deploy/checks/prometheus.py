"""Prometheus: promtool on the configurations, the alert rules and their unit tests and the dashboard's
queries; what the Compose configuration scrapes and the job its alerts match; the dashboard's queries on
a live Prometheus (the only check that talks to a server, on loopback)."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from deploy.checks.dashboard import dashboard_expressions, promql_rules, substitute_grafana_variables
from deploy.checks.files import (
    ALERT_TESTS,
    DASHBOARD,
    JOB,
    K8S_SCRAPE_CONFIG,
    PROMETHEUS,
    SERVER_PORT,
    load_yaml,
)
from deploy.checks.promql import check_expressions
from deploy.checks.tools import run


def k8s_scrape_config_for_promtool(path: Path = K8S_SCRAPE_CONFIG, target: str = f"127.0.0.2:{SERVER_PORT}",
                                   meta: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The Kubernetes scrape example with kubernetes_sd_configs swapped for one static target.

    Debian's Prometheus is built without Kubernetes service discovery, so it refuses the original; with a
    static target carrying the `__meta_kubernetes_*` labels that discovery would set (`meta`), promtool
    checks the rest and a real Prometheus applies the relabelling to it.
    """
    config = load_yaml(path)
    problems = []
    for job in config.get("scrape_configs", []):
        roles = [sd.get("role") for sd in job.pop("kubernetes_sd_configs", [])]
        if roles != ["pod"]:
            problems.append(f"{path.name}: job {job.get('job_name')} should discover pods (got {roles})")
        job["static_configs"] = [{"targets": [target], **({"labels": meta} if meta else {})}]
        labels = {rc.get("target_label") for rc in job.get("relabel_configs", [])}
        for needed in ("namespace", "pod", "job", "__address__", "__metrics_path__"):
            if needed not in labels:
                problems.append(f"{path.name}: job {job.get('job_name')} does not set {needed}")
    return yaml.safe_dump(config, sort_keys=False), problems


def promtool_problems(promtool: str = "promtool") -> list[str]:
    """promtool on the Compose configuration (with the alerts), the alert unit tests, the Kubernetes
    scrape example and the dashboard's queries."""
    if shutil.which(promtool) is None:
        return ["promtool is not installed: run scripts/install-system-deps.sh (Debian's `prometheus`)"]
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        k8s = Path(tmp) / "prometheus-kubernetes.yml"
        text, k8s_problems = k8s_scrape_config_for_promtool()
        k8s.write_text(text)
        rules = Path(tmp) / "dashboard-rules.yml"
        rules.write_text(promql_rules())
        problems += k8s_problems
        checks: list[list[str | Path]] = [["check", "config", PROMETHEUS], ["test", "rules", ALERT_TESTS],
                                          ["check", "config", k8s], ["check", "rules", rules]]
        for args in checks:
            code, out = run([promtool, *args])
            if code != 0:
                problems.append(f"promtool {' '.join(str(a) for a in args)}:\n{out.strip()}")
    return problems


def check_prometheus_config(model: dict[str, Any], path: Path = PROMETHEUS) -> list[str]:
    """Scrapes the Compose service on its container port, as job JOB; rules use only real metrics."""
    config = load_yaml(path)
    problems = []
    server = model["services"]["paligemma"]
    ports = {int(p["target"]) for p in server.get("ports", [])}
    want = f"paligemma:{SERVER_PORT}"
    jobs = [job for job in config.get("scrape_configs", [])
            if want in [t for sc in job.get("static_configs", []) for t in sc.get("targets", [])]]
    if SERVER_PORT not in ports or not jobs:
        problems.append(f"{path.name}: no job scrapes {want} (the Compose service on its container port)")
    for job in jobs:
        if job.get("job_name") != JOB:
            problems.append(f"{path.name}: job {job.get('job_name')!r} must be named {JOB!r} (alerts.yml)")
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{path.name}: job {job.get('job_name')} scrapes {job['metrics_path']}")
    for rule_file in config.get("rule_files", []):
        rules = [r for group in load_yaml(path.parent / rule_file).get("groups", []) for r in group["rules"]]
        problems += check_expressions([(f"{rule_file}: {r.get('alert') or r.get('record')}", str(r["expr"]))
                                       for r in rules])
    return problems


def promql_smoke(base_url: str, dashboard_path: Path = DASHBOARD) -> list[str]:
    """Run every dashboard query on a live Prometheus; each must evaluate, and the server be up."""
    problems = []
    dashboard = json.loads(dashboard_path.read_text())
    queries = [(w, substitute_grafana_variables(e)) for w, e in dashboard_expressions(dashboard)]
    queries.append(("scrape target", f'up{{job="{JOB}"}} == 1'))
    queries.append(("ready", "paligemma_ready == 1"))
    for where, expr in queries:
        url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except Exception as exc:
            problems.append(f"{where}: {expr!r} failed: {exc}")
            continue
        if body.get("status") != "success":
            problems.append(f"{where}: {expr!r}: {body.get('error')}")
        elif where in ("scrape target", "ready") and not body["data"]["result"]:
            problems.append(f"{where}: {expr!r} returned nothing")
    return problems
