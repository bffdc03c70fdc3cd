"""The locks every install and image uses: made from pyproject.toml, hash-checked, one torch release."""

from __future__ import annotations

import re
import shutil
import sys

from deploy.checks.dockerfile import dockerfile_args
from deploy.checks.files import REQUIREMENTS, ROOT
from tests.deployment.tooling import run


def _pins(name: str) -> dict[str, str]:
    lines = (REQUIREMENTS / name).read_text().splitlines()
    return dict(re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()  # type: ignore[union-attr]
                for line in lines if line and not line[0].isspace() and not line.startswith("#"))


def test_locks_match_pyproject():
    result = run(sys.executable, "scripts/lock.py", "check")
    assert result.returncode == 0, result.stderr


def test_lock_check_names_a_dependency_added_without_make_lock(tmp_path):
    # A copy of the inputs, as after a merge that added a dependency but not the lock.
    for part in ("pyproject.toml", "requirements", "scripts/lock.py"):
        source, target = ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "pytest>=8",', '    "pytest>=8",\n    "openai>=1.0",'))
    result = run(sys.executable, tmp_path / "scripts/lock.py", "check")
    assert result.returncode == 1
    assert "new in pyproject.toml / torch.in:  extra dev: openai>=1.0" in result.stderr
    assert "Run `make lock`" in result.stderr


def test_every_lock_is_hash_checked_and_torch_builds_are_the_pinned_release():
    version = next(line.split("==")[1] for line in (REQUIREMENTS / "torch.in").read_text().splitlines()
                   if line.startswith("torch=="))
    for lock in sorted(REQUIREMENTS.glob("*.lock")):
        pins = [line for line in lock.read_text().splitlines() if line and not line[0].isspace()
                and not line.startswith("#")]
        assert pins, lock
        assert all("==" in pin and pin.endswith("\\") for pin in pins), f"{lock.name}: a pin without hashes"
    assert "torch==" + version + "+cpu \\" in (REQUIREMENTS / "torch-cpu.lock").read_text()
    cuda = (REQUIREMENTS / f"torch-{dockerfile_args()['TORCH_CUDA']}.lock").read_text()
    assert f"torch=={version} \\" in cuda and "needs an NVIDIA driver >= " in cuda


def test_render_lock_goes_over_base_and_either_torch_build_with_the_dev_versions():
    render, dev = _pins("render.lock"), _pins("dev.lock")
    assert "supervision" in render
    # The image installs it over base.lock and one torch lock: nothing may be pinned twice.
    for other in ("base.lock", "torch-cpu.lock", f"torch-{dockerfile_args()['TORCH_CUDA']}.lock"):
        assert not set(render) & set(_pins(other)), other
    # `make install` (dev.lock) and an image with EXTRAS=render draw with the same versions.
    assert {name: dev[name] for name in render} == render
    # supervision draws with NumPy: no OpenCV, so nothing in the slim image needs libGL.
    assert not any(name.startswith("opencv") for name in render)


def test_quantization_lock_goes_over_base_and_either_torch_build_with_the_dev_versions():
    quantization, dev = _pins("quantization.lock"), _pins("dev.lock")
    assert {"bitsandbytes", "torchao"} <= set(quantization)
    for other in ("base.lock", "torch-cpu.lock", f"torch-{dockerfile_args()['TORCH_CUDA']}.lock", "render.lock"):
        assert not set(quantization) & set(_pins(other)), other
    assert {name: dev[name] for name in quantization} == quantization
