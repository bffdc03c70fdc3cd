"""Dependencies: state accessors and API-key auth. State lives on `app.state`, read only here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotReady, ShuttingDown
from app.lifecycle import Lifecycle, Phase
from app.metrics import Metrics
from app.serving.service import InferenceService


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


def get_service(request: Request) -> InferenceService:
    """The service, or 503 when it cannot take work (loading, draining, failed)."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.phase is Phase.DRAINING:
        raise ShuttingDown("the server is shutting down; retry on another replica",
                           headers={"Retry-After": "1"})
    if lifecycle.phase is Phase.FAILED:
        raise NotReady(f"the model worker failed ({lifecycle.failure}); the process is restarting")
    service = request.app.state.service
    if service is None or not lifecycle.ready:
        raise NotReady("the model is still loading; retry when /readyz answers 200",
                       headers={"Retry-After": "5"})
    return service


MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
