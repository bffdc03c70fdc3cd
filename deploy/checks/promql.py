"""The server's metric contract as Prometheus sees it, from its one source (app/metrics.py), and the
metric and label names a PromQL expression uses, so that dashboards and rules can be held to it."""

from __future__ import annotations

import re

from app.metrics import CONTRACT, PROCESS_PREFIXES, standard_metrics

# name -> type, counters under their `_total` name.
METRICS: dict[str, str] = {spec.samples[0] if spec.kind == "counter" else spec.name: spec.kind
                           for spec in CONTRACT}
# Beside the contract, the standard process_* and python_* series of prometheus_client's collectors, as
# the server's own registry has them: queries may use them; nothing has to show them.
STANDARD = standard_metrics()
# Labels a query may group by or match on: the metrics' own, histogram buckets, and the target labels
# Prometheus adds.
KNOWN_LABELS = ({label for spec in CONTRACT for label in spec.labels}
                | {label for _, labels in STANDARD.values() for label in labels}
                | {"le", "instance", "job", "namespace", "pod"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def all_metrics() -> list[tuple[str, str]]:
    """(name, type) of every metric the server declares: the contract, then the standard series."""
    return [*METRICS.items(), *((name, kind) for name, (kind, _) in STANDARD.items())]


def series_of(name: str, kind: str) -> set[str]:
    """The series names a metric is queried by: a histogram's _bucket/_sum/_count, else its name."""
    return {f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}


def queryable_names() -> set[str]:
    """Every series name the server exposes."""
    return set().union(*(series_of(name, kind) for name, kind in all_metrics()))


def metric_names(expr: str) -> set[str]:
    """The server's series an expression reads, `paligemma_*` and the standard `process_*`/`python_*`
    (string literals ignored)."""
    bare = _STRING.sub('""', expr)
    return {name for name in _IDENT.findall(bare) if name.startswith(("paligemma_", *PROCESS_PREFIXES))}


def label_names(expr: str) -> set[str]:
    """Labels an expression groups by or matches on."""
    bare = _STRING.sub('""', expr)
    labels: set[str] = set()
    for group in _GROUPING.findall(bare):
        labels.update(part.strip() for part in group.split(",") if part.strip())
    for selector in re.findall(r"\{([^}]*)\}", bare):
        labels.update(_MATCHER.findall(selector))
    return labels


def check_expressions(exprs: list[tuple[str, str]]) -> list[str]:
    """Every metric and label an expression uses exists on the server."""
    problems = []
    known = queryable_names()
    for where, expr in exprs:
        for name in sorted(metric_names(expr) - known):
            exposed = ", ".join([*sorted(METRICS), *sorted(STANDARD)])
            problems.append(f"{where}: unknown metric {name!r} (the server exposes: {exposed})")
        for label in sorted(label_names(expr) - KNOWN_LABELS):
            problems.append(f"{where}: unknown label {label!r} in {expr!r}")
    return problems
