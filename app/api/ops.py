"""Operational endpoints: health, readiness, metrics, the loaded model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.convert import adapter_card
from app.api.deps import LifecycleDep, MetricsDep, ServiceDep
from app.api.errors import ERROR_RESPONSES
from app.metrics import CONTENT_TYPE
from app.model.loader import RANDOM_WEIGHTS_WARNING
from app.schemas import AdapterSlots, Health, MaskDecoderInfo, ModelCard, ModelList

router = APIRouter(tags=["operations"])  # probes: never behind a key
metrics_router = APIRouter(tags=["operations"])
models_router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: 200 unless the model worker is stuck",
            responses={503: {"model": Health, "description": "One model step has run longer than "
                                                             "PALIGEMMA_LIVENESS_STALL_S: restart me."}})
async def healthz(request: Request) -> JSONResponse:
    service = request.app.state.service
    limit = request.app.state.settings.liveness_stall_s
    if service is not None and service.stalled_for() > limit:
        return JSONResponse({"status": "stalled"}, status_code=503)
    return JSONResponse({"status": "alive"})


@router.get("/readyz", response_model=Health, summary="Readiness: 200 once the model is loaded and warmed up",
            responses={503: {"model": Health, "description": "Loading, draining or failed."}})
async def readyz(lifecycle: LifecycleDep) -> JSONResponse:
    status = 200 if lifecycle.ready else 503
    return JSONResponse({"status": lifecycle.phase.value}, status_code=status)


@metrics_router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)


@models_router.get("/v1/models", response_model=ModelList, summary="The loaded model and its LoRA adapters",
                   responses=ERROR_RESPONSES)
async def models(request: Request, service: ServiceDep) -> ModelList:
    loaded = service.loaded
    decoder = service.mask_decoder
    card = ModelCard(
        id=loaded.name,
        random_weights=loaded.random_weights,
        warning=RANDOM_WEIGHTS_WARNING.format(name=loaded.name) if loaded.random_weights else None,
        about=loaded.about,
        image_size=loaded.image_size,
        image_tokens=loaded.image_seq_length,
        parameters=loaded.parameters,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        masks=service.masks_enabled,
        mask_decoder=MaskDecoderInfo(path=str(decoder.path), sha256=decoder.sha256,
                                     matches_published=decoder.matches_published) if decoder else None,
        max_batch_size=service.engine.scheduler.rows,
        max_prompt_tokens=service.settings.max_prompt_tokens,
        decode_graphs=service.decode_graphs,
        decode_graphs_failure=service.decode_graphs_failure,
        max_new_tokens=service.settings.max_new_tokens,
        default_max_new_tokens=service.settings.default_max_new_tokens,
        quantization=loaded.quantization.value,
        vision_quantized=loaded.vision_quantized,
        weight_bytes=loaded.weight_bytes,
        kv_cache_bytes=getattr(service.runner, "cache_bytes", None),
        memory_plan=plan.as_dict() if (plan := request.app.state.memory_plan) is not None else None,
        adapters=None,
    )
    registry = service.adapters
    if registry is None:
        return ModelList(data=[card])
    bank = registry.bank
    card.adapters = AdapterSlots(max_adapters=bank.max_adapters, max_lora_rank=bank.max_rank,
                                 memory_bytes=bank.bytes, loaded=len(registry.names),
                                 runtime_loading=registry.root is not None)
    return ModelList(data=[card, *(adapter_card(adapter, loaded.name) for adapter in registry.adapters())])
