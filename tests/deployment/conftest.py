"""Fixtures of the deployment checks (deploy/checks/): the tools they drive and the files as rendered."""

from __future__ import annotations

import pytest

from deploy.checks import compose as compose_checks
from deploy.checks import kubernetes
from deploy.checks.files import COMPOSE, COMPOSE_GPU, COMPOSE_LOCAL, KUBERNETES, load_yaml_docs
from tests.deployment.tooling import require_tool


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> list[dict]:
    return load_yaml_docs(kubernetes.render_kustomize(KUBERNETES, kubectl))


@pytest.fixture(scope="session")
def compose() -> dict[str, dict]:
    require_tool("docker-compose")
    return {"base": compose_checks.compose_model(COMPOSE),
            "gpu": compose_checks.compose_model(COMPOSE, COMPOSE_GPU),
            "local": compose_checks.compose_model(COMPOSE, COMPOSE_LOCAL)}
