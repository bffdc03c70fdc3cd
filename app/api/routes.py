"""The app's endpoints as a table read from its own routes: for 404 messages that list them, and for
labelling a request with its route template when the router never saw it (a 413 answered by middleware).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from starlette.routing import compile_path
from starlette.types import Scope


@dataclass(frozen=True)
class Endpoint:
    path: str  # the template, e.g. /v1/caption
    methods: frozenset[str]
    pattern: re.Pattern[str]


def _flat(routes: Iterable[object]) -> Iterator[object]:
    """Every route, routers included with `include_router` opened up. FastAPI >= 0.16x keeps included
    routers as one entry each and offers `iter_route_contexts` to walk them; older releases flatten them
    into `app.routes` themselves (tests/model/test_api.py checks the listing either way)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI
        yield from routes
    else:
        yield from iter_route_contexts(list(routes))  # type: ignore[arg-type]


class RouteTable:
    def __init__(self, routes: Iterable[object]):
        endpoints = []
        for route in _flat(routes):
            path, methods = getattr(route, "path", None), getattr(route, "methods", None)
            if path and methods:  # mounts (static files) have no methods
                endpoints.append(Endpoint(path, frozenset(methods) - {"HEAD"}, compile_path(path)[0]))
        self.endpoints = endpoints

    def listing(self) -> list[str]:
        """`METHOD /path` for every endpoint, the /v1 API first."""
        listed = [(e.path, m) for e in self.endpoints for m in sorted(e.methods)]
        listed.sort(key=lambda pm: (not pm[0].startswith("/v1/"), pm[0], pm[1]))
        return [f"{method} {path}" for path, method in listed]

    def template(self, path: str, method: str) -> str | None:
        """The template of the route the router would pick for `path` (one that takes `method` first)."""
        matching = [e for e in self.endpoints if e.pattern.match(path)]
        for endpoint in matching:
            if method in endpoint.methods:
                return endpoint.path
        return matching[0].path if matching else None


def route_table(app: object) -> RouteTable:
    """The table of `app`, built on first use (all routes exist by the first request) and kept."""
    state = app.state  # type: ignore[attr-defined]
    table = getattr(state, "route_table", None)
    if table is None:
        table = state.route_table = RouteTable(app.routes)  # type: ignore[attr-defined]
    return table


def route_template(scope: Scope) -> str | None:
    """The route template of this request: the router's choice when it ran, else matched here."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    if app is None or not hasattr(app, "routes"):
        return None
    return route_table(app).template(scope.get("path", ""), scope.get("method", ""))
