"""The Grafana dashboard and its provisioning: panels query only what the server exposes and show every
metric of the contract, the datasource and dashboard folders are where Compose mounts them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from deploy.checks.compose import mounts
from deploy.checks.files import DASHBOARD, DASHBOARD_PROVIDERS, DATASOURCES, GRAFANA, load_yaml
from deploy.checks.promql import METRICS, check_expressions, metric_names, series_of

# Grafana's variables, replaced by plausible values so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}


def substitute_grafana_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query of the dashboard: panel targets and template variables."""
    exprs = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            # label_values(metric, label) is Grafana's, not PromQL: check the metric inside it only.
            match = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", query)
            exprs.append((f"variable {variable.get('name')!r}", match.group(1) if match else query))
    return exprs


def check_dashboard(path: Path = DASHBOARD, datasources: Path = DATASOURCES) -> list[str]:
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: not readable JSON: {exc}"]
    problems = [f"{path.name}: no {key!r}" for key in ("uid", "title", "panels", "schemaVersion")
                if key not in dashboard]
    uids = {ds.get("uid") for ds in load_yaml(datasources).get("datasources", [])}
    ids = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        ids.append(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            problems.append(f"panel {panel.get('title')!r} has no queries")
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if isinstance(ref, dict) and ref.get("uid") not in uids:
                problems.append(f"panel {panel.get('title')!r}: datasource uid {ref.get('uid')!r} is not "
                                f"provisioned (provisioned: {sorted(uids)})")
    if len(ids) != len(set(ids)):
        problems.append(f"{path.name}: duplicate panel ids")
    exprs = dashboard_expressions(dashboard)
    problems += check_expressions(exprs)
    used = set().union(*(metric_names(e) for _, e in exprs)) if exprs else set()
    problems += [f"{path.name}: no panel shows {name}" for name, kind in METRICS.items()
                 if not used & series_of(name, kind)]
    latency = [e for _, e in exprs if "paligemma_request_duration_seconds_bucket" in e]
    for quantile in ("0.5", "0.9", "0.99"):
        if not any(f"histogram_quantile({quantile}," in e for e in latency):
            problems.append(f"{path.name}: no p{quantile[2:].ljust(2, '0')} request latency panel")
    return problems


def promql_rules(dashboard_path: Path = DASHBOARD) -> str:
    """The dashboard's queries as recording rules, so `promtool check rules` parses each one."""
    dashboard = json.loads(dashboard_path.read_text())
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute_grafana_variables(expr)}
             for i, (_, expr) in enumerate(dashboard_expressions(dashboard))]
    return yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False)


def check_grafana_provisioning(model: dict[str, Any]) -> list[str]:
    """Grafana reads the provisioning files and the dashboard folder where Compose mounts them."""
    grafana_mounts = mounts(model["services"]["grafana"])
    problems = []
    if grafana_mounts.get("/etc/grafana/provisioning") != str(GRAFANA / "provisioning"):
        problems.append("grafana: deploy/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    dashboards = next((target for target, source in grafana_mounts.items()
                       if source == str(DASHBOARD.parent)), None)
    paths = {p.get("options", {}).get("path") for p in load_yaml(DASHBOARD_PROVIDERS).get("providers", [])}
    if dashboards is None or dashboards not in paths:
        problems.append(f"grafana: the dashboard provider reads {sorted(map(str, paths))}, but Compose "
                        f"mounts deploy/grafana/dashboards at {dashboards}")
    grafana_env = model["services"]["grafana"].get("environment", {})
    home = grafana_env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and dashboards and home != f"{dashboards}/{DASHBOARD.name}":
        problems.append(f"grafana: home dashboard {home} is not {dashboards}/{DASHBOARD.name}")
    return problems
