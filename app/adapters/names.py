"""Adapter names and the `PALIGEMMA_ADAPTERS` list: pure functions, no torch (settings read them)."""

from __future__ import annotations

import re
from pathlib import Path

# A name travels in URLs (/v1/adapters/{name}), form fields and metric labels: keep it plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter, or None."""
    if not NAME_PATTERN.fullmatch(name):
        return f"adapter name {name!r} is not valid: use {NAME_RULE}"
    return None


def parse_adapter_list(value: str) -> tuple[tuple[str, Path], ...]:
    """`name=path,name2=path2` -> ((name, path), ...); ValueError naming the first bad entry."""
    entries: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise ValueError(f"{entry!r} is not name=path (e.g. receipts=/adapters/receipts)")
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        if name in seen:
            raise ValueError(f"adapter name {name!r} is given twice")
        seen.add(name)
        entries.append((name, Path(path)))
    return tuple(entries)
