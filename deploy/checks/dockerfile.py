"""The image's Dockerfile: hadolint, and what the image promises that no linter knows (its HEALTHCHECK
is the liveness signal with probe timings the liveness rule accepts; its GPU default is a locked CUDA
line)."""

from __future__ import annotations

import re
from pathlib import Path

from deploy.checks import shutdown
from deploy.checks.files import DOCKERFILE, PROMETHEUS_DOCKERFILE, REQUIREMENTS, ROOT, parse_duration
from deploy.checks.tools import checker_problems


def hadolint_problems() -> list[str]:
    return checker_problems("hadolint",
                            ["--config", ROOT / ".hadolint.yaml", DOCKERFILE, PROMETHEUS_DOCKERFILE],
                            "finds problems in the Dockerfiles")


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Build arguments with their defaults (`ARG NAME=value`; `ARG NAME=""` as the empty string)."""
    args = dict(arg.split("=", 1) for kind, arg in dockerfile_instructions(path)
                if kind == "ARG" and "=" in arg)
    return {name: value.strip('"') for name, value in args.items()}


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    env: dict[str, str] = {}
    for kind, args in dockerfile_instructions(path):
        if kind == "ENV":
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args))
    return env


def healthcheck_options(arguments: str) -> dict[str, float]:
    """HEALTHCHECK's --interval/--timeout/--start-period (seconds) and --retries, with Docker's defaults."""
    options = {"interval": 30.0, "timeout": 30.0, "start-period": 0.0, "retries": 3.0}
    for name, value in re.findall(r"--([a-z-]+)=(\S+)", arguments.split(" CMD ", 1)[0]):
        options[name] = float(value) if name == "retries" else parse_duration(value)
    return options


def check_dockerfile(path: Path = DOCKERFILE) -> list[str]:
    """The HEALTHCHECK GETs /healthz with timings the liveness rule accepts; the GPU default is a locked
    CUDA line; the default EXTRAS each have a lock."""
    problems = []
    checks = [args for kind, args in dockerfile_instructions(path) if kind == "HEALTHCHECK"]
    if not checks or "/healthz" not in checks[-1]:
        problems.append("docker/Dockerfile: HEALTHCHECK must GET /healthz (liveness), not "
                        f"{checks[-1] if checks else 'nothing'}")
    else:
        options = healthcheck_options(checks[-1])
        problems += [f"docker/Dockerfile: HEALTHCHECK {p}" for p in shutdown.liveness_problems(
            period_s=options["interval"], timeout_s=options["timeout"], failures=int(options["retries"]))]
    args = dockerfile_args(path)
    line = args.get("TORCH_CUDA")
    if not (REQUIREMENTS / f"torch-{line}.lock").is_file():
        problems.append(f"docker/Dockerfile: TORCH_CUDA defaults to {line}, which has no requirements/torch-"
                        f"{line}.lock (scripts/lock.py CUDA_LINE)")
    for extra in filter(None, args.get("EXTRAS", "").split(",")):
        if not (REQUIREMENTS / f"{extra}.lock").is_file():
            problems.append(f"docker/Dockerfile: EXTRAS defaults to {extra}, which has no requirements/"
                            f"{extra}.lock (scripts/lock.py)")
    return problems
