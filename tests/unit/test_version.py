"""The version is written once, in app/__init__.py; the package metadata and the API read it there."""

from __future__ import annotations

from pathlib import Path

import pytest

import app
from app.main import create_app
from app.settings import Settings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_takes_the_version_from_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads(PYPROJECT.read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "app.__version__"}


def test_the_openapi_document_reports_it() -> None:
    assert create_app(Settings()).openapi()["info"]["version"] == app.__version__
