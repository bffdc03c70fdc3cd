"""Typed results: the server's response bodies (app/schemas.py in paligemma-server), as pydantic models.

Field for field the server's models (a test in the server's repository checks both ways). Fields a
newer server adds are kept (`extra="allow"`), so an older client still reads its answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import supervision as sv


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Box(_Model):
    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int


class ImageSize(_Model):
    width: int
    height: int


class Timings(_Model):
    prepare_ms: float
    queue_and_inference_ms: float
    postprocess_ms: float
    total_ms: float


class TaskResponse(_Model):
    model: str
    usage: Usage
    image: ImageSize
    finish_reason: Literal["stop", "length"]
    raw_text: str
    timings: Timings
    warning: str | None = None
    adapter: str | None = None


class TextResponse(TaskResponse):
    text: str


class AnswerResponse(TaskResponse):
    answer: str


class Detection(_Model):
    label: str
    box: Box
    box_normalized: Box


class RLE(_Model):
    size: list[int]
    counts: str


class Segment(Detection):
    mask: RLE | None
    mask_area: int | None = None
    mask_box: Box | None = None
    mask_tokens: list[int] | None
    mask_error: str | None = None


class DetectResponse(TaskResponse):
    detections: list[Detection]
    dropped: int

    def to_supervision(self) -> sv.Detections:
        """The boxes as `sv.Detections`: xyxy in pixels, labels in `data["class_name"]`."""
        from paligemma_client.convert import to_detections

        return to_detections(self.detections, self.image)


class SegmentResponse(TaskResponse):
    segments: list[Segment]
    dropped: int

    def to_supervision(self) -> sv.Detections:
        """Boxes and masks as `sv.Detections`: xyxy in pixels, labels in `data["class_name"]`, boolean
        masks (height, width) decoded from the RLE (all False for a segment the server sent no mask for)."""
        from paligemma_client.convert import to_detections

        return to_detections(self.segments, self.image)


class GenerateResponse(TaskResponse):
    text: str
    detections: list[Detection] | None = None
    segments: list[Segment] | None = None

    def to_supervision(self) -> sv.Detections:
        """Whatever the output located, detections then segments, as `sv.Detections`."""
        from paligemma_client.convert import to_detections

        return to_detections([*(self.detections or []), *(self.segments or [])], self.image)


class MaskDecoderInfo(_Model):
    path: str
    sha256: str
    matches_published: bool


class AdapterSlots(_Model):
    max_adapters: int
    max_lora_rank: int
    memory_bytes: int
    loaded: int
    runtime_loading: bool


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    random_weights: bool
    warning: str | None
    about: str | None = None
    image_size: int
    image_tokens: int
    parameters: int
    dtype: str
    device: str
    masks: bool
    mask_decoder: MaskDecoderInfo | None
    max_batch_size: int
    max_prompt_tokens: int
    decode_graphs: list[int]
    decode_graphs_failure: str | None = None
    max_new_tokens: int
    default_max_new_tokens: int
    # Servers before the memory plan and quantized weights did not send these.
    quantization: str = "none"
    vision_quantized: bool = False
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    memory_plan: dict[str, Any] | None = None
    adapters: AdapterSlots | None = None


class AdapterCard(_Model):
    id: str
    object: Literal["model"] = "model"
    parent: str
    created: int
    rank: int
    layers: int
    vision: bool
    base_model: str | None


class AdapterDeleted(_Model):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard | AdapterCard]

    @property
    def base(self) -> ModelCard:
        """The served base model: the first entry (each loaded adapter follows it)."""
        card = self.data[0]
        if not isinstance(card, ModelCard):
            raise TypeError(f"the first entry of /v1/models is the adapter {card.id!r}, not the base model")
        return card


class ErrorBody(_Model):
    type: str
    message: str
    param: str | None = None
    request_id: str | None = None


class ErrorResponse(_Model):
    error: ErrorBody
