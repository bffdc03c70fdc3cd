"""Finding and running the field's checkers: pip-installed ones from the project's virtualenv, system
ones (kubectl, promtool, podman) from PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.checks.files import ROOT, SHELL_SCRIPTS

INSTALL_HINT = ("`make install` puts it in .venv; promtool and kubectl come from "
                "scripts/install-system-deps.sh")


def tool(name: str) -> str | None:
    """A checker from the project's virtualenv (pip-installed binaries) or PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which(name, path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


def run(args: list[str | Path], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Run a tool; (exit code, stdout + stderr)."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False,
                            cwd=cwd, env=env)
    return result.returncode, result.stdout + result.stderr


def checker_problems(name: str, args: list[str | Path], what: str) -> list[str]:
    """Run checker `name`; its complaint as one problem, or that it is missing (never a silent pass)."""
    path = tool(name)
    if path is None:
        return [f"{name} is not installed ({INSTALL_HINT})"]
    code, out = run([path, *args])
    return [] if code == 0 else [f"{name} {what}:\n{out.strip()}"]


def shellcheck_problems() -> list[str]:
    return checker_problems("shellcheck", ["--severity=warning", *SHELL_SCRIPTS],
                            "finds problems in the scripts")
