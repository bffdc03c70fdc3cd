"""Kubernetes files outside the base agree with it: the prometheus-adapter rule publishes the HPA's
metric, the ServiceMonitor scrapes the Service's /metrics as the alerts' job, the example Ingress and
NetworkPolicy reach the Service's and the pods' port."""

from __future__ import annotations

from typing import Any

from deploy.checks.files import ADAPTER_VALUES, JOB, K8S_EXAMPLES, SERVICE_MONITOR, load_yaml, load_yaml_docs
from deploy.checks.kubernetes import by_kind, selects


def servicemonitor_job(monitor: dict[str, Any], service: dict[str, Any]) -> str:
    """The job label the Prometheus Operator gives a ServiceMonitor's targets: the value of the Service's
    `spec.jobLabel` label when set, else the Service's name."""
    label = monitor["spec"].get("jobLabel")
    return service["metadata"].get("labels", {}).get(label) if label else service["metadata"]["name"]


def _servicemonitor_problems(service: dict[str, Any]) -> list[str]:
    monitor = load_yaml(SERVICE_MONITOR)
    port_names = {p.get("name") for p in service["spec"]["ports"]}
    if monitor.get("kind") != "ServiceMonitor":
        return [f"{SERVICE_MONITOR.name}: not a ServiceMonitor"]
    if not selects(monitor["spec"]["selector"].get("matchLabels", {}), service["metadata"].get("labels", {})):
        return [f"{SERVICE_MONITOR.name}: does not select the Service"]
    problems = [f"{SERVICE_MONITOR.name}: endpoint {endpoint} is not the Service's /metrics"
                for endpoint in monitor["spec"].get("endpoints", [])
                if endpoint.get("port") not in port_names or endpoint.get("path", "/metrics") != "/metrics"]
    job = servicemonitor_job(monitor, service)
    if job != JOB:
        problems.append(f"{SERVICE_MONITOR.name}: its targets' job is {job!r}, not {JOB!r} (alerts.yml)")
    return problems


def check_kubernetes_extras(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    kinds = by_kind(docs)
    service = kinds["Service"][0]
    pod_labels = kinds["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    hpa_metric = kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = load_yaml(ADAPTER_VALUES).get("rules", {}).get("custom", [])
    if not any(hpa_metric in r.get("seriesQuery", "") and r.get("name", {}).get("as") == hpa_metric
               and {"namespace", "pod"} <= set(r.get("resources", {}).get("overrides", {})) for r in rules):
        problems.append(f"{ADAPTER_VALUES.name}: no rule publishing {hpa_metric} per namespace/pod")
    problems += _servicemonitor_problems(service)
    port_names = {p.get("name") for p in service["spec"]["ports"]}
    examples = {doc["kind"]: doc for path in K8S_EXAMPLES[:2] for doc in load_yaml_docs(path.read_text())}
    backend = examples["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    if backend["name"] != service["metadata"]["name"] or backend["port"].get("name") not in port_names:
        problems.append(f"examples/ingress-nginx.yaml: backend {backend} is not the Service's port")
    policy = examples["NetworkPolicy"]["spec"]
    if not selects(policy["podSelector"].get("matchLabels", {}), pod_labels):
        problems.append("examples/networkpolicy.yaml does not select the pods")
    if not all(p.get("port") == "http" for rule in policy.get("ingress", []) for p in rule.get("ports", [])):
        problems.append("examples/networkpolicy.yaml: ingress must allow the pods' `http` port")
    return problems
