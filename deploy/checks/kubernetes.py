"""Kubernetes: kustomize rendering, kubernetes-validate's schemas, and the rendered base's invariants
(probes, graceful termination, GPU and disk, config and secret wiring, security, scaling, scraping)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from deploy.checks import shutdown
from deploy.checks.dockerfile import dockerfile_env
from deploy.checks.files import KUBERNETES, SECRET_EXAMPLE, SERVER_PORT, load_yaml, parse_quantity
from deploy.checks.server_config import server_settings
from deploy.checks.tools import checker_problems, run

# The oldest Kubernetes release the manifests promise to work on, and kubernetes-validate's newest.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Loading (and downloading) a real checkpoint takes minutes: the startup probe's allowance.
STARTUP_ALLOWANCE_S = 600
PROBES = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}


def render_kustomize(directory: Path = KUBERNETES, kubectl: str = "kubectl") -> str:
    code, out = run([kubectl, "kustomize", directory])
    if code != 0:
        raise RuntimeError(f"`{kubectl} kustomize {directory}` failed:\n{out}")
    return out


def kubernetes_validate_problems(paths: list[Path]) -> list[str]:
    """Strict schema validation (unknown fields are errors) against the oldest and newest release."""
    problems = []
    for version in K8S_VERSIONS:
        problems += checker_problems("kubernetes-validate", ["--strict", "--quiet", "-k", version, *paths],
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


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc.get("kind", "?"), []).append(doc)
    return kinds


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pre_stop_seconds(container: dict[str, Any]) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else None


def _probe_problems(container: dict[str, Any], ports: dict[str, int], server_port: int) -> list[str]:
    problems = []
    for kind, path in PROBES.items():
        probe = container.get(kind)
        if not probe:
            problems.append(f"container has no {kind}")
            continue
        if probe.get("httpGet", {}).get("path") != path:
            problems.append(f"{kind} must GET {path}, not {probe.get('httpGet', {}).get('path')}")
        port = probe.get("httpGet", {}).get("port")
        if (ports.get(port) if isinstance(port, str) else port) != server_port:
            problems.append(f"{kind} probes port {port}, not the server's {server_port}")
    startup = container.get("startupProbe") or {}
    allowance = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if allowance < STARTUP_ALLOWANCE_S:
        problems.append(f"startupProbe allows {allowance} s; loading a real checkpoint needs "
                        f"~{STARTUP_ALLOWANCE_S} s")
    liveness = container.get("livenessProbe") or {}
    problems += [f"livenessProbe: {p}" for p in shutdown.liveness_problems(
        period_s=liveness.get("periodSeconds", 10), timeout_s=liveness.get("timeoutSeconds", 1),
        failures=liveness.get("failureThreshold", 3))]
    return problems


def _resource_problems(spec: dict[str, Any], resources: dict[str, Any]) -> list[str]:
    problems = []
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
    return problems


def _wiring_problems(container: dict[str, Any], configmap: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The ConfigMap and the Secret reach the container; volumes where the image expects them; security."""
    problems = []
    config = configmap.get("data", {})
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
    problems += [f"{name} is in the ConfigMap; it belongs in the Secret"
                 for name in ("HF_TOKEN", "PALIGEMMA_API_KEYS") if name in config]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    hf_home = next((e["value"] for e in container.get("env", []) if e["name"] == "HF_HOME"),
                   dockerfile_env().get("HF_HOME"))
    problems += [f"no volume mounted at {path}" for path in (hf_home, "/models")
                 if mounts.get(path) not in volumes]
    context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    if not context.get("runAsNonRoot"):
        problems.append("pod must run as non-root (runAsNonRoot)")
    if context.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
        problems.append("read-only root filesystem without a writable /tmp")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false: the server never calls the API")
    return problems


def check_kubernetes(docs: list[dict[str, Any]]) -> list[str]:
    """The rendered base. (Schemas are kubernetes-validate's job.)"""
    kinds = by_kind(docs)
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
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    container = spec["containers"][0]
    settings, problems = server_settings("ConfigMap", configmap.get("data", {}))
    server_port = settings.port if settings else SERVER_PORT
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if ports.get("http") != server_port:
        problems.append(f"container port `http` ({ports.get('http')}) != PALIGEMMA_PORT ({server_port})")
    problems += _probe_problems(container, ports, server_port)
    sleep = pre_stop_seconds(container)
    if sleep is None:
        problems.append("container has no preStop sleep (endpoints must drop the pod before SIGTERM)")
    if settings is not None:
        problems += shutdown.stall_problems(settings.liveness_stall_s, settings.request_timeout_s)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        problems += shutdown.grace_problems("terminationGracePeriodSeconds", grace, settings.drain_timeout_s,
                                            sleep or 0.0)
    problems += _resource_problems(spec, container.get("resources", {}))
    problems += _wiring_problems(container, configmap, spec)

    annotations = pod["metadata"].get("annotations", {})
    scrape = annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port")
    if scrape != ("true", str(server_port)):
        problems.append("pod template lacks prometheus.io/scrape and prometheus.io/port annotations")
    if not selects(deployment["spec"]["selector"].get("matchLabels", {}), pod_labels):
        problems.append("Deployment selector does not match its pod labels")
    if not selects(service["spec"].get("selector", {}), pod_labels):
        problems.append("Service selector does not match the pods")
    for port in service["spec"].get("ports", []):
        target = port.get("targetPort")
        if (ports.get(target) if isinstance(target, str) else target) != server_port:
            problems.append(f"Service port {port.get('name')} targets {target}, not the server's port")
    if not selects(pdb["spec"].get("selector", {}).get("matchLabels", {}), pod_labels):
        problems.append("PodDisruptionBudget does not select the pods")
    ref = hpa["spec"].get("scaleTargetRef", {})
    if (ref.get("kind"), ref.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        problems.append("HPA does not scale the Deployment")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"].get("metrics", [])
                    if m.get("type") == "Pods"]
    if pods_metrics != ["paligemma_queue_depth"]:
        problems.append(f"HPA must scale on the Pods metric paligemma_queue_depth (has {pods_metrics})")
    return problems
