"""The settings table of docs/configuration.md lists exactly the settings `app.settings.Settings` reads,
with their defaults: a setting added, removed or changed in one place only fails here."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import ENV_PREFIX, Settings

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented() -> dict[str, str]:
    table: dict[str, str] = {}
    for line in CONFIGURATION.read_text().splitlines():
        if not line.startswith("| `PALIGEMMA_"):
            continue
        cells = line.split("|")
        names = re.findall(r"`(PALIGEMMA_\w+)`", cells[1])
        defaults = re.findall(r"`([^`]*)`", cells[2]) or [""] * len(names)
        table.update(zip(names, defaults, strict=True))
    return table


def _default(value: object) -> str:
    if value is None or value == ():
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_is_documented_and_every_documented_variable_is_a_setting():
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(documented()) == settings


def test_the_documented_defaults_are_the_real_ones():
    table = documented()
    for name, field in Settings.model_fields.items():
        assert table[ENV_PREFIX + name.upper()] == _default(field.default), name
