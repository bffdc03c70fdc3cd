"""Running the deployment checkers from the tests.

The tools (hadolint, shellcheck, Docker Compose, podman-compose, kubernetes-validate, promtool, kubectl)
are required, not optional: a missing one fails with the command that installs it, so that CI never
passes by silently checking less.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.checks.files import ROOT
from deploy.checks.tools import tool

INSTALL_HINT = "run `sudo scripts/install-system-deps.sh` (kubectl, promtool, prometheus, podman from apt)"


def require_tool(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}, or `make install` for the Python ones",
                    pytrace=False)
    return path


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=cwd)
