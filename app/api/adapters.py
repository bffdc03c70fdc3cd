"""Loading and unloading LoRA adapters at run time: `POST /v1/adapters`, `DELETE /v1/adapters/{name}`.

Only folders under PALIGEMMA_ADAPTER_ROOT can be loaded (the endpoints answer 403 while it is unset);
like every /v1 route, they need an API key when keys are set. Loading reads and checks the folder off the
model's thread and writes its slot between two steps, so running requests never wait on it; unloading
refuses new requests for the adapter at once and answers when its running ones have finished.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.adapters.names import NAME_RULE
from app.adapters.registry import RUNTIME_LOADING_OFF, AdapterRegistry
from app.api.convert import adapter_card
from app.api.deps import ServiceDep
from app.api.errors import ERROR_RESPONSES
from app.errors import Forbidden
from app.schemas import AdapterCard, AdapterDeleted
from app.serving.service import InferenceService

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=ERROR_RESPONSES)


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"What requests will call it: {NAME_RULE}.")
    path: str = Field(description="Its folder (adapter_config.json, adapter_model.safetensors), absolute or "
                                  "relative to PALIGEMMA_ADAPTER_ROOT, and inside it.")


def _registry(service: InferenceService) -> AdapterRegistry:
    if service.adapters is None or service.adapters.root is None:
        raise Forbidden(RUNTIME_LOADING_OFF)
    return service.adapters


@router.post("", response_model=AdapterCard, status_code=201, summary="Load a LoRA adapter folder",
             responses={403: {"description": "Run-time loading is off (PALIGEMMA_ADAPTER_ROOT unset)."},
                        409: {"description": "The name is taken, or every slot is."}})
async def load_adapter(body: AdapterLoad, service: ServiceDep) -> AdapterCard:
    registry = _registry(service)
    adapter = await registry.load(body.name, body.path, service.engine.between_steps)
    return adapter_card(adapter, service.loaded.name)


@router.delete("/{name}", response_model=AdapterDeleted, summary="Unload a LoRA adapter",
               responses={403: {"description": "Run-time loading is off (PALIGEMMA_ADAPTER_ROOT unset)."}})
async def unload_adapter(name: str, service: ServiceDep) -> AdapterDeleted:
    registry = _registry(service)
    await registry.unload(name, service.engine.between_steps)
    return AdapterDeleted(id=name)
