"""Internal results -> public response models, in one place (the edge)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.model.loader import RANDOM_WEIGHTS_WARNING
from app.schemas import RLE, AdapterCard, Box, Detection, ImageSize, Segment, Timings, Usage
from app.serving.jobs import JobResult, ObjectResult
from app.serving.service import InferenceService
from app.tasks.parsing import Box as InternalBox

if TYPE_CHECKING:
    from app.adapters.registry import LoadedAdapter


def box(b: InternalBox) -> Box:
    return Box(x_min=b.x_min, y_min=b.y_min, x_max=b.x_max, y_max=b.y_max)


def common_fields(result: JobResult, service: InferenceService) -> dict[str, Any]:
    loaded = service.loaded
    return {
        "model": loaded.name,
        "usage": Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        "image": ImageSize(width=result.width, height=result.height),
        "finish_reason": "stop" if result.finished else "length",
        "raw_text": result.text,
        "timings": Timings(**result.timings),
        "warning": RANDOM_WEIGHTS_WARNING.format(name=loaded.name) if loaded.random_weights else None,
        "adapter": result.adapter,
    }


def adapter_card(adapter: LoadedAdapter, parent: str) -> AdapterCard:
    return AdapterCard(id=adapter.name, parent=parent, created=adapter.created, rank=adapter.rank,
                       layers=adapter.layers, vision=adapter.ref.vision, base_model=adapter.base_model)


def detection(obj: ObjectResult) -> Detection:
    return Detection(label=obj.label, box=box(obj.box), box_normalized=box(obj.box_normalized))


def segment(obj: ObjectResult) -> Segment:
    mask = obj.mask
    return Segment(
        label=obj.label,
        box=box(obj.box),
        box_normalized=box(obj.box_normalized),
        mask=RLE(size=list(mask.rle["size"]), counts=str(mask.rle["counts"])) if mask else None,  # type: ignore[call-overload]
        mask_area=mask.area if mask else None,
        mask_box=box(mask.box) if mask and mask.box else None,
        mask_tokens=list(obj.mask_tokens) if obj.mask_tokens is not None else None,
        mask_error=obj.mask_problem if mask is None else None,
    )
