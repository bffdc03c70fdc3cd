"""The public contract: every response body the API returns, as pydantic models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Box(BaseModel):
    x_min: float = Field(description="Left edge.")
    y_min: float = Field(description="Top edge.")
    x_max: float = Field(description="Right edge.")
    y_max: float = Field(description="Bottom edge.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt, the image tokens included.")
    completion_tokens: int = Field(description="Tokens generated, the final <eos> included.")


class ImageSize(BaseModel):
    width: int = Field(description="Width of the uploaded image in pixels, after EXIF orientation.")
    height: int = Field(description="Height of the uploaded image in pixels, after EXIF orientation.")


class Timings(BaseModel):
    prepare_ms: float = Field(description="Decoding and resizing the image.")
    queue_and_inference_ms: float = Field(description="Waiting for a batch and running the model.")
    postprocess_ms: float = Field(description="Turning the output into boxes and masks.")
    total_ms: float


class TaskResponse(BaseModel):
    model: str = Field(description="The loaded model (preset name, hub id or directory).")
    usage: Usage
    image: ImageSize
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: the model ended its answer; `length`: cut at max_new_tokens."
    )
    raw_text: str = Field(description="The model's output as generated, <loc>/<seg> tokens included.")
    timings: Timings
    warning: str | None = Field(None, description="Set when the weights are random (outputs meaningless).")
    adapter: str | None = Field(None, description="The LoRA adapter the answer came from; null: the base.")


class TextResponse(TaskResponse):
    text: str = Field(description="The caption, or the text read from the image.")


class AnswerResponse(TaskResponse):
    answer: str


class Detection(BaseModel):
    label: str = Field(description="The object name as the model wrote it.")
    box: Box = Field(description="In pixels of the uploaded image.")
    box_normalized: Box = Field(description="In [0, 1] of the image's width and height.")


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width] of the image.", min_length=2, max_length=2)
    counts: str = Field(description="COCO compressed run-length counts, as pycocotools writes them.")


class Segment(Detection):
    mask: RLE | None = Field(
        description="The decoded mask over the whole image; null when none could be made."
    )
    mask_area: int | None = Field(None, description="Pixels in the mask.")
    mask_box: Box | None = Field(None, description="Pixel box around the mask's pixels.")
    mask_tokens: list[int] | None = Field(
        description="The <seg> codebook indices the model emitted (16 when valid)."
    )
    mask_error: str | None = Field(None, description="Why `mask` is null, when it is.")


class DetectResponse(TaskResponse):
    detections: list[Detection]
    dropped: int = Field(description="Object-like fragments in the output that could not be parsed.")


class SegmentResponse(TaskResponse):
    segments: list[Segment]
    dropped: int = Field(description="Object-like fragments in the output that could not be parsed.")


class GenerateResponse(TaskResponse):
    text: str = Field(description="The output without <loc>/<seg> tokens.")
    detections: list[Detection] | None = Field(None, description="Present when the output holds boxes.")
    segments: list[Segment] | None = Field(None, description="Present when the output holds <seg> tokens.")


class MaskDecoderInfo(BaseModel):
    path: str
    sha256: str
    matches_published: bool


class AdapterSlots(BaseModel):
    max_adapters: int = Field(description="Adapter slots (PALIGEMMA_MAX_ADAPTERS).")
    max_lora_rank: int = Field(description="Highest rank a slot holds (PALIGEMMA_MAX_LORA_RANK).")
    memory_bytes: int = Field(description="Device memory of the stacked adapter weights, every slot.")
    loaded: int = Field(description="Adapters loaded now.")
    runtime_loading: bool = Field(description="Whether POST /v1/adapters loads folders "
                                              "(PALIGEMMA_ADAPTER_ROOT).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    random_weights: bool
    warning: str | None
    about: str | None = Field(
        None, description="What the model is, when the server knows: the built-in `demo` says what world it "
                          "was trained on (its answers on other images mean nothing).")
    image_size: int = Field(description="Input resolution in pixels (square).")
    image_tokens: int
    parameters: int
    dtype: str
    device: str
    masks: bool = Field(description="Whether /v1/segment returns decoded masks.")
    mask_decoder: MaskDecoderInfo | None
    max_batch_size: int = Field(description="Requests generating together (rows of the KV cache).")
    max_prompt_tokens: int = Field(description="Most text tokens in a prompt, after the image tokens.")
    decode_graphs: list[int] = Field(
        description="Row counts whose decode step was captured as a CUDA graph (empty: decoding eagerly)."
    )
    decode_graphs_failure: str | None = Field(
        None, description="Why the decode graphs were discarded at warm-up (they disagreed with the eager "
                          "step, or capturing them failed): the server decodes eagerly. Null otherwise.")
    max_new_tokens: int
    default_max_new_tokens: int
    # Defaults only so that clients of older servers, which sent none of these, read a card the same way.
    quantization: str = Field("none", description="The language model's linear layers: none, int8, nf4 or "
                                                  "bnb-int8 (a checkpoint saved in bitsandbytes' 8-bit).")
    vision_quantized: bool = Field(False,
                                   description="Whether the vision tower and projector are quantized too.")
    weight_bytes: int | None = Field(None, description="Bytes the weights take on the device, measured after "
                                                       "loading.")
    kv_cache_bytes: int | None = Field(None, description="Bytes of the preallocated KV cache.")
    memory_plan: dict[str, Any] | None = Field(
        None, description="The start-up memory plan (`paligemma-server plan --json` for these settings), or "
                          "null when the model's config could not be read before loading.")
    adapters: AdapterSlots | None = Field(None, description="LoRA adapter slots; null when adapters are off.")


class AdapterCard(BaseModel):
    """A LoRA adapter served beside the base: select it with `adapter` (or the OpenAI `model` field)."""

    id: str = Field(description="The adapter's name.")
    object: Literal["model"] = "model"
    parent: str = Field(description="The base model it runs on (the id of the base's entry).")
    created: int = Field(description="When it was loaded (Unix time).")
    rank: int = Field(description="Its LoRA rank (the highest, when layers differ).")
    layers: int = Field(description="Linear layers it adapts.")
    vision: bool = Field(description="Whether it adapts the vision tower or the projector.")
    base_model: str | None = Field(description="The base it says it was trained on "
                                               "(base_model_name_or_path).")


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | AdapterCard] = Field(description="The base first, then each adapter.")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_request, queue_full.")
    message: str = Field(description="What was wrong and how to fix it.")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    request_id: str | None = Field(None, description="Quote it when reporting a server error.")


class ErrorResponse(BaseModel):
    error: ErrorBody
