"""Offline checks of the deployment files, shared by deploy/check.sh and tests/test_deploy.py.

Each `check_*` function returns a list of problems (empty when all is well) instead of raising, so
that one run reports every mistake at once. Only the standard library and PyYAML are used (PyYAML
comes with transformers), and nothing here touches the network except `promql_smoke`, which talks
to a Prometheus on loopback that deploy/check.sh started.

    python deploy/validate.py static                 # every check that needs no external tool
    python deploy/validate.py kubernetes RENDERED    # output of `kubectl kustomize deploy/kubernetes`
    python deploy/validate.py promql-rules OUT       # dashboard queries as a rules file for promtool
    python deploy/validate.py k8s-scrape-config OUT  # examples/prometheus-kubernetes.yml for promtool
    python deploy/validate.py example-overlay DIR    # an overlay applying examples/persistent-volumes
    python deploy/validate.py exposition FILE        # a /metrics scrape of the running server
    python deploy/validate.py make-png OUT           # a small test image, without Pillow
    python deploy/validate.py promql-smoke URL       # run the dashboard queries on a live Prometheus
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/paligemma.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning/dashboards/paligemma.yml"
KUBERNETES = ROOT / "deploy/kubernetes"
K8S_SCRAPE_CONFIG = KUBERNETES / "examples/prometheus-kubernetes.yml"
ADAPTER_VALUES = KUBERNETES / "examples/prometheus-adapter-values.yaml"
SERVICE_MONITOR = KUBERNETES / "optional/servicemonitor.yaml"
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"

# The server's metric contract (app/metrics.py), as Prometheus sees it: name -> type.
METRICS: dict[str, str] = {
    "paligemma_requests_total": "counter",
    "paligemma_request_duration_seconds": "histogram",
    "paligemma_queue_wait_seconds": "histogram",
    "paligemma_inference_duration_seconds": "histogram",
    "paligemma_batch_size": "histogram",
    "paligemma_queue_depth": "gauge",
    "paligemma_generated_tokens_total": "counter",
    "paligemma_prompt_tokens_total": "counter",
    "paligemma_rejections_total": "counter",
    "paligemma_model_info": "gauge",
    "paligemma_ready": "gauge",
}
# Labels a query may group by or match on: the metrics' own, histogram buckets, and the target labels
# Prometheus adds.
KNOWN_LABELS = {"endpoint", "status", "reason", "model", "dtype", "device", "random_weights", "masks",
                "le", "instance", "job", "namespace", "pod"}
# Series Prometheus makes itself that rules may use.
BUILTIN_SERIES = {"up"}
# Grafana's variables, replaced by plausible values so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}

DEFAULT_DRAIN_TIMEOUT_S = 30.0
SERVER_PORT = 8000


def queryable_names() -> set[str]:
    """Every series name the server exposes: histograms as their _bucket/_sum/_count series."""
    names: set[str] = set()
    for name, kind in METRICS.items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


# --------------------------------------------------------------------------------------------- YAML
class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's `!reset` / `!override` merge tags."""


class Reset:
    """Stands for a `!reset` value: Compose drops the key that the earlier file set."""

    def __repr__(self) -> str:
        return "Reset()"


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass: no code runs


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


# ---------------------------------------------------------------------------------------------- PromQL
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """The `paligemma_*` series an expression reads (string literals ignored)."""
    bare = _STRING.sub('""', expr)
    return {name for name in _IDENT.findall(bare) if name.startswith("paligemma_")}


def label_names(expr: str) -> set[str]:
    """Labels an expression groups by or matches on."""
    bare = _STRING.sub('""', expr)
    labels: set[str] = set()
    for group in _GROUPING.findall(bare):
        labels.update(part.strip() for part in group.split(",") if part.strip())
    for selector in re.findall(r"\{([^}]*)\}", bare):
        labels.update(_MATCHER.findall(selector))
    return labels


def check_expressions(exprs: list[tuple[str, str]]) -> list[str]:
    """Every metric and label an expression uses exists on the server."""
    problems = []
    known = queryable_names()
    for where, expr in exprs:
        for name in sorted(metric_names(expr) - known):
            exposed = ", ".join(sorted(METRICS))
            problems.append(f"{where}: unknown metric {name!r} (the server exposes: {exposed})")
        for label in sorted(label_names(expr) - KNOWN_LABELS):
            problems.append(f"{where}: unknown label {label!r} in {expr!r}")
    return problems


def substitute_grafana_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


# -------------------------------------------------------------------------------------------- Grafana
def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query of the dashboard: panel targets and template variables."""
    exprs = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            # label_values(metric, label) is Grafana's, not PromQL: check the metric inside it only.
            match = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", query)
            exprs.append((f"variable {variable.get('name')!r}", match.group(1) if match else query))
    return exprs


def check_dashboard(path: Path = DASHBOARD, datasources: Path = DATASOURCES) -> list[str]:
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: not readable JSON: {exc}"]
    problems = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"{path.name}: no {key!r}")
    uids = {ds.get("uid") for ds in load_yaml(datasources).get("datasources", [])}
    ids = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        ids.append(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            problems.append(f"panel {panel.get('title')!r} has no queries")
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if isinstance(ref, dict) and ref.get("uid") not in uids:
                problems.append(f"panel {panel.get('title')!r}: datasource uid {ref.get('uid')!r} is not "
                                f"provisioned (provisioned: {sorted(uids)})")
    if len(ids) != len(set(ids)):
        problems.append(f"{path.name}: duplicate panel ids")
    exprs = dashboard_expressions(dashboard)
    problems += check_expressions(exprs)
    used = set().union(*(metric_names(e) for _, e in exprs)) if exprs else set()
    for name, kind in METRICS.items():
        series = {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        if not used & series:
            problems.append(f"{path.name}: no panel shows {name}")
    latency = [e for _, e in exprs if "paligemma_request_duration_seconds_bucket" in e]
    for quantile in ("0.5", "0.9", "0.99"):
        if not any(f"histogram_quantile({quantile}," in e for e in latency):
            problems.append(f"{path.name}: no p{quantile[2:].ljust(2, '0')} request latency panel")
    return problems


def promql_rules(dashboard_path: Path = DASHBOARD) -> str:
    """The dashboard's queries as recording rules, so `promtool check rules` parses each one."""
    dashboard = json.loads(dashboard_path.read_text())
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute_grafana_variables(expr)}
             for i, (_, expr) in enumerate(dashboard_expressions(dashboard))]
    return yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False)


def check_grafana_provisioning(compose_path: Path = COMPOSE) -> list[str]:
    """Grafana reads the provisioning files and the dashboard folder where Compose mounts them."""
    grafana = load_yaml(compose_path)["services"]["grafana"]
    volumes = [_split_volume(v) for v in grafana.get("volumes", [])]
    mounts = {source: target for source, target, _ in volumes}
    problems = []
    if mounts.get("./deploy/grafana/provisioning") != "/etc/grafana/provisioning":
        problems.append("grafana: deploy/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    dashboards = mounts.get("./deploy/grafana/dashboards")
    paths = {p.get("options", {}).get("path") for p in load_yaml(DASHBOARD_PROVIDERS).get("providers", [])}
    if dashboards is None or dashboards not in paths:
        problems.append(f"grafana: the dashboard provider reads {sorted(map(str, paths))}, but Compose "
                        f"mounts deploy/grafana/dashboards at {dashboards}")
    home = _environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and dashboards and home != f"{dashboards}/{DASHBOARD.name}":
        problems.append(f"grafana: home dashboard {home} is not {dashboards}/{DASHBOARD.name}")
    return problems


# ----------------------------------------------------------------------------------------- Prometheus
def check_prometheus_config(path: Path = PROMETHEUS, compose_path: Path = COMPOSE) -> list[str]:
    """Scrapes the Compose service on the server's port; alert rules only use real metrics."""
    config = load_yaml(path)
    problems = []
    targets = [t for job in config.get("scrape_configs", []) for sc in job.get("static_configs", [])
               for t in sc.get("targets", [])]
    services = load_yaml(compose_path).get("services", {})
    want = f"paligemma:{SERVER_PORT}"
    if want not in targets:
        problems.append(f"{path.name}: no scrape target {want!r} (targets: {targets})")
    if "paligemma" not in services:
        problems.append("docker-compose.yml has no `paligemma` service for Prometheus to scrape")
    for job in config.get("scrape_configs", []):
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{path.name}: job {job.get('job_name')} scrapes {job['metrics_path']}, "
                            "not /metrics")
    for rule_file in config.get("rule_files", []):
        rule_path = path.parent / rule_file
        if not rule_path.is_file():
            problems.append(f"{path.name}: rule file {rule_file} does not exist")
            continue
        exprs = [(f"{rule_file}: {r.get('alert') or r.get('record')}", str(r["expr"]))
                 for group in load_yaml(rule_path).get("groups", []) for r in group.get("rules", [])]
        problems += check_expressions(exprs)
    return problems


def k8s_scrape_config_for_promtool(path: Path = K8S_SCRAPE_CONFIG) -> tuple[str, list[str]]:
    """The Kubernetes scrape example with kubernetes_sd_configs swapped for a static target.

    Debian's Prometheus is built without Kubernetes service discovery, so its promtool refuses the
    original; the swap lets it still check everything else (relabel regexes, fields, layout).
    """
    config = load_yaml(path)
    problems = []
    for job in config.get("scrape_configs", []):
        roles = [sd.get("role") for sd in job.pop("kubernetes_sd_configs", [])]
        if roles != ["pod"]:
            problems.append(f"{path.name}: job {job.get('job_name')} should discover pods (got {roles})")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{SERVER_PORT}"]}]
        labels = {rc.get("target_label") for rc in job.get("relabel_configs", [])}
        for needed in ("namespace", "pod", "__address__", "__metrics_path__"):
            if needed not in labels:
                problems.append(f"{path.name}: job {job.get('job_name')} does not set {needed}")
    return yaml.safe_dump(config, sort_keys=False), problems


# --------------------------------------------------------------------------------------- Docker/Compose
def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """ENV values of the Dockerfile's last stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = re.split(r"(?m)^FROM\s", text)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line))
    return env


def check_dockerfile(path: Path = DOCKERFILE, ignore: Path = DOCKERIGNORE) -> list[str]:
    text = path.read_text()
    joined = re.sub(r"\\\n", " ", text)
    problems = []
    head = joined.split("\nFROM", 1)[0]
    if not re.search(r"(?m)^ARG BASE_IMAGE=python:3\.11-slim-bookworm\s*$", head):
        problems.append("Dockerfile: `ARG BASE_IMAGE=python:3.11-slim-bookworm` must come before the "
                        "first FROM")
    if len(re.findall(r"(?m)^FROM ", joined)) < 2:
        problems.append("Dockerfile: not multi-stage")
    if not re.search(r"(?m)^ARG VARIANT=gpu\s*$", joined):
        problems.append("Dockerfile: no `ARG VARIANT=gpu`")
    last = re.split(r"(?m)^FROM\s", joined)[-1]
    user = re.findall(r"(?m)^USER\s+(\S+)", last)
    if not user or user[-1].split(":")[0] in ("0", "root"):
        problems.append("Dockerfile: the final stage must switch to a non-root USER")
    if not re.search(r"(?m)^HEALTHCHECK .*?/healthz", last):
        problems.append("Dockerfile: no HEALTHCHECK on /healthz")
    if not re.search(r"(?m)^STOPSIGNAL SIGTERM\s*$", last):
        problems.append("Dockerfile: no `STOPSIGNAL SIGTERM`")
    if not re.search(rf"(?m)^EXPOSE {SERVER_PORT}\s*$", last):
        problems.append(f"Dockerfile: no `EXPOSE {SERVER_PORT}`")
    hf_home = dockerfile_env(path).get("HF_HOME")
    if not hf_home or not re.search(rf'(?m)^VOLUME .*"{re.escape(hf_home)}"', last):
        problems.append("Dockerfile: HF_HOME must be set and declared a VOLUME")
    patterns = {line.strip() for line in ignore.read_text().splitlines() if line.strip()}
    for needed in (".venv", ".git", "benchmarks/out", "**/__pycache__", ".pytest_cache"):
        if needed not in patterns:
            problems.append(f".dockerignore: does not exclude {needed}")
    for copied in re.findall(r"(?m)^COPY (?!--from)(?:--\S+ )*(.+) \S+$", joined):
        for source in copied.split():
            if not any(ch in source for ch in "*?[") and not (ROOT / source).exists():
                problems.append(f"Dockerfile: COPY source {source} does not exist")
    return problems


def _split_volume(spec: str | dict[str, Any]) -> tuple[str, str, str]:
    if isinstance(spec, dict):
        return str(spec.get("source", "")), str(spec.get("target", "")), "ro" if spec.get("read_only") else ""
    parts = spec.split(":")
    return parts[0], parts[1] if len(parts) > 1 else parts[0], parts[2] if len(parts) > 2 else ""


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` with an empty environment: what a fresh shell gets."""
    environ = environ or {}
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}",
                  lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def check_compose(path: Path = COMPOSE, cpu_path: Path = COMPOSE_CPU) -> list[str]:
    compose = load_yaml(path)
    services = compose.get("services", {})
    problems = [f"{path.name}: no service {name!r}" for name in ("paligemma", "prometheus", "grafana")
                if name not in services]
    if problems:
        return problems
    server = services["paligemma"]
    build = server.get("build", {})
    if (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() != DOCKERFILE:
        problems.append(f"{path.name}: paligemma is not built from ./Dockerfile")
    if interpolate(str(build.get("args", {}).get("VARIANT", ""))) != "gpu":
        problems.append(f"{path.name}: the default build must be VARIANT=gpu")
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in d.get("capabilities", []) for d in devices):
        problems.append(f"{path.name}: paligemma reserves no GPU (deploy.resources.reservations.devices)")
    if not any(str(p).split(":")[-1] == str(SERVER_PORT) for p in server.get("ports", [])):
        problems.append(f"{path.name}: container port {SERVER_PORT} is not published")
    env = _environment(server)
    drain = float(interpolate(str(env.get("PALIGEMMA_DRAIN_TIMEOUT_S") or DEFAULT_DRAIN_TIMEOUT_S)))
    grace = parse_duration(server.get("stop_grace_period", "10s"))
    if grace <= drain:
        problems.append(f"{path.name}: stop_grace_period ({grace:g} s) must exceed PALIGEMMA_DRAIN_TIMEOUT_S "
                        f"({drain:g} s) or the drain is cut short")
    for name, value in env.items():
        if isinstance(value, str) and value.startswith("${") and value.endswith(":-}"):
            problems.append(f"{path.name}: {name}: `${{VAR:-}}` reaches podman-compose 1.0 literally; "
                            "leave the value empty to pass it through")
    hf_home = dockerfile_env().get("HF_HOME", "")
    targets = {_split_volume(v)[1] for v in server.get("volumes", [])}
    if hf_home not in targets:
        problems.append(f"{path.name}: no volume at the image's HF_HOME ({hf_home})")
    named = set(compose.get("volumes") or {})
    for svc_name, svc in services.items():
        for spec in svc.get("volumes", []):
            source = _split_volume(spec)[0]
            if source.startswith((".", "/")):
                if not (ROOT / source).exists():
                    problems.append(f"{path.name}: {svc_name} mounts {source}, which does not exist")
            elif source not in named:
                problems.append(f"{path.name}: {svc_name} uses volume {source!r}, "
                                "not declared under volumes:")
    prom_volumes = [_split_volume(v) for v in services["prometheus"].get("volumes", [])]
    prom_mounts = {target: source for source, target, _ in prom_volumes}
    if prom_mounts.get("/etc/prometheus") != "./deploy/prometheus":
        problems.append(f"{path.name}: prometheus does not mount ./deploy/prometheus at /etc/prometheus")
    if not cpu_path.is_file():
        return [*problems, f"{cpu_path.name} is missing"]
    cpu = load_yaml(cpu_path).get("services", {}).get("paligemma", {})
    if str(cpu.get("build", {}).get("args", {}).get("VARIANT")) != "cpu":
        problems.append(f"{cpu_path.name}: does not build VARIANT=cpu")
    if not isinstance(cpu.get("deploy"), Reset):
        problems.append(f"{cpu_path.name}: does not drop the GPU reservation (`deploy: !reset {{}}`)")
    return problems


# ----------------------------------------------------------------------------------------- Kubernetes
def render_kustomize(directory: Path = KUBERNETES, kubectl: str = "kubectl") -> str:
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{kubectl} kustomize {directory}` failed:\n{result.stderr}")
    return result.stdout


def kustomize_is_modern(kubectl: str = "kubectl") -> bool:
    """Whether kubectl embeds kustomize >= 4 (kubectl >= 1.21): `resources` may name directories and
    `patches` exists. Older ones (Debian's kubernetes-client 1.20) need `bases` and
    `patchesStrategicMerge`."""
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    match = re.search(r"Kustomize Version: v?(\d+)", out)
    return bool(match and int(match.group(1)) >= 4)


def write_example_overlay(directory: Path, kubectl: str = "kubectl") -> None:
    """The overlay deploy/kubernetes/README.md describes, around examples/persistent-volumes.

    An overlay cannot live inside its base, so checks build it in a temporary directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("pvcs.yaml", "volumes-patch.yaml"):
        shutil.copy(KUBERNETES / "examples/persistent-volumes" / name, directory / name)
    base = os.path.relpath(KUBERNETES, directory)
    if kustomize_is_modern(kubectl):
        text = f"resources:\n  - {base}\n  - pvcs.yaml\npatches:\n  - path: volumes-patch.yaml\n"
    else:
        text = (f"bases:\n  - {base}\nresources:\n  - pvcs.yaml\n"
                "patchesStrategicMerge:\n  - volumes-patch.yaml\n")
    (directory / "kustomization.yaml").write_text(text)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc.get("kind", "?"), []).append(doc)
    return kinds


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _probe_port(probe: dict[str, Any], ports: dict[str, int]) -> int | None:
    port = probe.get("httpGet", {}).get("port")
    return ports.get(port) if isinstance(port, str) else port


def check_kubernetes(docs: list[dict[str, Any]]) -> list[str]:
    """The rendered base: probes, graceful termination, GPU, config/secret wiring, scaling, scraping."""
    kinds = _by_kind(docs)
    problems = [f"rendered base has no {kind}" for kind in
                ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap")
                if len(kinds.get(kind, [])) != 1]
    if "Secret" in kinds:
        problems.append("rendered base contains a Secret: secrets must be created out of band")
    if problems:
        return problems
    deployment, service = kinds["Deployment"][0], kinds["Service"][0]
    hpa, pdb = kinds["HorizontalPodAutoscaler"][0], kinds["PodDisruptionBudget"][0]
    configmap = kinds["ConfigMap"][0]
    config = configmap.get("data", {})
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    container = spec["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    server_port = int(config.get("PALIGEMMA_PORT", SERVER_PORT))
    if ports.get("http") != server_port:
        problems.append(f"container port `http` ({ports.get('http')}) != PALIGEMMA_PORT ({server_port})")

    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for kind, path in expected.items():
        probe = container.get(kind)
        if not probe:
            problems.append(f"container has no {kind}")
            continue
        if probe.get("httpGet", {}).get("path") != path:
            problems.append(f"{kind} must GET {path}, not {probe.get('httpGet', {}).get('path')}")
        if _probe_port(probe, ports) != server_port:
            port = probe.get("httpGet", {}).get("port")
            problems.append(f"{kind} probes port {port}, not the server's {server_port}")
    startup = container.get("startupProbe") or {}
    allowance = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if allowance < 600:
        problems.append(f"startupProbe allows {allowance} s; loading a real checkpoint needs ~600 s")

    drain = float(config.get("PALIGEMMA_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep = pre_stop.get("sleep", {}).get("seconds")
    if sleep is None and len(command) == 2 and command[0] == "sleep":
        sleep = float(command[1])
    if sleep is None:
        problems.append("container has no preStop sleep (endpoints must drop the pod before SIGTERM)")
        sleep = 0
    if grace <= drain + sleep:
        problems.append(f"terminationGracePeriodSeconds ({grace}) must exceed preStop sleep ({sleep:g}) + "
                        f"PALIGEMMA_DRAIN_TIMEOUT_S ({drain:g})")

    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        if str(resources.get(part, {}).get("nvidia.com/gpu")) != "1":
            problems.append(f"resources.{part} must hold nvidia.com/gpu: 1")
    if "memory" not in resources.get("limits", {}) or "cpu" not in resources.get("requests", {}):
        problems.append("resources need a memory limit and a cpu request")

    env_from = container.get("envFrom", [])
    if configmap["metadata"]["name"] not in [e.get("configMapRef", {}).get("name") for e in env_from]:
        problems.append("container does not take its environment from the rendered ConfigMap")
    secret_refs = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    example = load_yaml(SECRET_EXAMPLE)
    if secret_refs != [example["metadata"]["name"]]:
        problems.append(f"envFrom secretRef {secret_refs} != secret.example.yaml's "
                        f"{example['metadata']['name']}")
    if not {"HF_TOKEN", "PALIGEMMA_API_KEYS"} <= set(example.get("stringData", {})):
        problems.append("secret.example.yaml must show HF_TOKEN and PALIGEMMA_API_KEYS")
    for name in ("HF_TOKEN", "PALIGEMMA_API_KEYS"):
        if name in config:
            problems.append(f"{name} is in the ConfigMap; it belongs in the Secret")

    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    hf_home = next((e["value"] for e in container.get("env", []) if e["name"] == "HF_HOME"),
                   dockerfile_env().get("HF_HOME"))
    for mount_path in (hf_home, "/models"):
        if mounts.get(mount_path) not in volumes:
            problems.append(f"no volume mounted at {mount_path}")
    context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    if not context.get("runAsNonRoot"):
        problems.append("pod must run as non-root (runAsNonRoot)")
    if context.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
        problems.append("read-only root filesystem without a writable /tmp")

    annotations = pod["metadata"].get("annotations", {})
    scrape = annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port")
    if scrape != ("true", str(server_port)):
        problems.append("pod template lacks prometheus.io/scrape and prometheus.io/port annotations")
    if not _selects(deployment["spec"]["selector"].get("matchLabels", {}), pod_labels):
        problems.append("Deployment selector does not match its pod labels")
    if not _selects(service["spec"].get("selector", {}), pod_labels):
        problems.append("Service selector does not match the pods")
    for port in service["spec"].get("ports", []):
        target = port.get("targetPort")
        if (ports.get(target) if isinstance(target, str) else target) != server_port:
            problems.append(f"Service port {port.get('name')} targets {target}, not the server's port")
    if not _selects(pdb["spec"].get("selector", {}).get("matchLabels", {}), pod_labels):
        problems.append("PodDisruptionBudget does not select the pods")

    if hpa.get("apiVersion") != "autoscaling/v2":
        problems.append("HPA must be autoscaling/v2")
    ref = hpa["spec"].get("scaleTargetRef", {})
    if (ref.get("kind"), ref.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        problems.append("HPA does not scale the Deployment")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"].get("metrics", [])
                    if m.get("type") == "Pods"]
    if pods_metrics != ["paligemma_queue_depth"]:
        problems.append(f"HPA must scale on the Pods metric paligemma_queue_depth (has {pods_metrics})")
    return problems


def check_kubernetes_extras(docs: list[dict[str, Any]]) -> list[str]:
    """Files outside the base agree with it: adapter rule, ServiceMonitor."""
    problems = []
    kinds = _by_kind(docs)
    service = kinds["Service"][0]
    hpa_metric = kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = load_yaml(ADAPTER_VALUES).get("rules", {}).get("custom", [])
    if not any(hpa_metric in r.get("seriesQuery", "") and r.get("name", {}).get("as") == hpa_metric
               and {"namespace", "pod"} <= set(r.get("resources", {}).get("overrides", {})) for r in rules):
        problems.append(f"{ADAPTER_VALUES.name}: no rule publishing {hpa_metric} per namespace/pod")
    monitor = load_yaml(SERVICE_MONITOR)
    if monitor.get("kind") != "ServiceMonitor":
        problems.append(f"{SERVICE_MONITOR.name}: not a ServiceMonitor")
    elif not _selects(monitor["spec"]["selector"].get("matchLabels", {}),
                      service["metadata"].get("labels", {})):
        problems.append(f"{SERVICE_MONITOR.name}: does not select the Service")
    else:
        port_names = {p.get("name") for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"].get("endpoints", []):
            if endpoint.get("port") not in port_names or endpoint.get("path", "/metrics") != "/metrics":
                problems.append(f"{SERVICE_MONITOR.name}: endpoint {endpoint} is not the Service's /metrics")
    return problems


# ------------------------------------------------------------------------------------- live server
def check_exposition(text: str) -> list[str]:
    """A /metrics scrape declares every metric of the contract with its type."""
    declared = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))
    problems = []
    for name, kind in METRICS.items():
        # prometheus_client declares counters with or without _total depending on its version.
        found = declared.get(name) or declared.get(name.removesuffix("_total"))
        if found is None:
            problems.append(f"/metrics does not declare {name}")
        elif found != kind:
            problems.append(f"/metrics declares {name} as {found}, expected {kind}")
    return problems


def promql_smoke(base_url: str, dashboard_path: Path = DASHBOARD) -> list[str]:
    """Run every dashboard query on a live Prometheus; each must evaluate, and the server be up."""
    problems = []
    dashboard = json.loads(dashboard_path.read_text())
    queries = [(w, substitute_grafana_variables(e)) for w, e in dashboard_expressions(dashboard)]
    queries.append(("scrape target", 'up{job="paligemma"} == 1'))
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


def make_png(width: int = 64, height: int = 48) -> bytes:
    """A small RGB gradient PNG (the host may have no Pillow)."""
    # Each scanline: filter byte 0, then RGB triples.
    rows = b"".join(b"\x00" + b"".join(bytes((x * 4 % 256, y * 5 % 256, 128)) for x in range(width))
                    for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# ------------------------------------------------------------------------------------------------ CLI
def static_problems() -> list[str]:
    problems = check_dockerfile() + check_compose() + check_prometheus_config() + check_dashboard()
    problems += check_grafana_provisioning() + k8s_scrape_config_for_promtool()[1]
    return problems


def _report(problems: list[str], what: str) -> int:
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"  {'ok' if not problems else f'{len(problems)} problem(s)'}: {what}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("static", [])
    if command == "static":
        return _report(static_problems(), "Dockerfile, Compose, Prometheus and Grafana files")
    if command == "kubernetes":
        docs = load_yaml_docs(Path(args[0]).read_text())
        return _report(check_kubernetes(docs) + check_kubernetes_extras(docs), "rendered Kubernetes base")
    if command == "promql-rules":
        Path(args[0]).write_text(promql_rules())
        return 0
    if command == "k8s-scrape-config":
        text, problems = k8s_scrape_config_for_promtool()
        Path(args[0]).write_text(text)
        return _report(problems, K8S_SCRAPE_CONFIG.name)
    if command == "example-overlay":
        write_example_overlay(Path(args[0]))
        return 0
    if command == "exposition":
        return _report(check_exposition(Path(args[0]).read_text()), "/metrics declares every metric")
    if command == "make-png":
        Path(args[0]).write_bytes(make_png())
        return 0
    if command == "promql-smoke":
        return _report(promql_smoke(args[0]), "dashboard queries on a live Prometheus")
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
