"""Where the deployment files live, how they are read, and the units they write durations and sizes in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILE = ROOT / "docker/Dockerfile"
PROMETHEUS_DOCKERFILE = ROOT / "docker/prometheus/Dockerfile"
ENTRYPOINT = ROOT / "docker/entrypoint.sh"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_GPU = ROOT / "docker/compose.gpu.yaml"
COMPOSE_LOCAL = ROOT / "docker/compose.local.yaml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/paligemma.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning/dashboards/paligemma.yml"
KUBERNETES = ROOT / "deploy/kubernetes"
K8S_SCRAPE_CONFIG = KUBERNETES / "examples/prometheus-kubernetes.yml"
ADAPTER_VALUES = KUBERNETES / "examples/prometheus-adapter-values.yaml"
SERVICE_MONITOR = KUBERNETES / "optional/servicemonitor.yaml"
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
# Kubernetes manifests outside the base, validated on their own (the Helm values file is not one).
K8S_EXAMPLES = [KUBERNETES / "examples/ingress-nginx.yaml", KUBERNETES / "examples/networkpolicy.yaml",
                KUBERNETES / "examples/persistent-volumes/pvcs.yaml"]
SHELL_SCRIPTS = [ROOT / "deploy/check.sh", ENTRYPOINT, ROOT / "docker/make-base-image.sh",
                 ROOT / "scripts/install-system-deps.sh"]
REQUIREMENTS = ROOT / "requirements"

SERVER_PORT = 8000
# The job label every scrape set-up gives the server, and the one the alerts match.
JOB = "paligemma-server"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def parse_duration(value: str | int | float) -> float:
    """Compose/Go durations ("45s", "1m30s", "1h") or plain seconds, in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"not a duration: {value!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_quantity(value: str | int) -> float:
    """Kubernetes quantities ("40Gi", "100Mi", "2G", "500m") as a number of bytes / units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(value).strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12, "m": 1e-3}
    return float(match.group(1)) * scale[match.group(2)]
