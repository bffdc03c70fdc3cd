"""Request bodies of the task endpoints: one pydantic model per endpoint, for multipart and JSON alike.

Each endpoint takes `multipart/form-data` (the image as a file field `image`) or `application/json` (the
image as base64, a data URL, or an allowed http(s) URL). Both go through the same model, so both have
the same fields, bounds and errors; unknown fields are refused (422) rather than ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IMAGE_HELP = ("The image: JPEG, PNG or WebP. In multipart, a file field (`curl -F image=@photo.jpg`); in "
              "JSON, base64, a `data:image/...;base64,` URL, or an http(s) URL of a host the server allows "
              "(PALIGEMMA_IMAGE_URL_HOSTS).")


class TaskBody(BaseModel):
    """Fields every task endpoint takes."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description=IMAGE_HELP)
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default PALIGEMMA_DEFAULT_MAX_NEW_TOKENS, at most "
                                "PALIGEMMA_MAX_NEW_TOKENS).")
    stream: bool = Field(False, description="Answer with server-sent events: a `delta` event per generated "
                                            "piece of text, then a `result` event holding the whole result.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default): greedy, the same output "
                                                                "every time. Above 0: sample.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sample from the smallest set of tokens whose "
                                                         "probability reaches top_p (with temperature > 0).")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Sample from the k likeliest tokens (0: no limit).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling repeatable: the same "
                                                                   "request and seed give the same output.")
    adapter: str | None = Field(None, max_length=64, description="A loaded LoRA adapter's name (GET "
                                                                 "/v1/models lists them); unset: the base.")


class CaptionBody(TaskBody):
    language: str = Field("en", max_length=16, description="Answer language, e.g. en, es, fr, de, ja.")
    long: bool = Field(False, description="A long description (`describe`) instead of a caption.")


class VqaBody(TaskBody):
    question: str = Field(description="The question.")
    language: str = Field("en", max_length=16, description="Answer language, e.g. en, es, fr, de, ja.")


class OcrBody(TaskBody):
    pass


class _LocatingBody(TaskBody):
    objects: list[str] | str = Field(description="One or more object names or referring expressions: a list, "
                                                 "the field repeated, or `a ; b` in one value.")
    render: bool = Field(False, description="Answer with the image, its boxes, labels and masks drawn (PNG) "
                                            "instead of JSON; `Accept: image/png` does the same.")


class DetectBody(_LocatingBody):
    pass


class SegmentBody(_LocatingBody):
    pass


class GenerateBody(TaskBody):
    prompt: str = Field(description="The prefix as PaliGemma takes it, e.g. `caption es` or `detect car ; "
                                    "person` (the server adds the image tokens and <bos> itself).")


def request_body_doc(model: type[TaskBody]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of an endpoint: the same fields as multipart (image a file) or JSON."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    properties = schema["properties"]
    multipart = {**schema, "properties": {**properties, "image": {"type": "string", "format": "binary",
                                                                  "description": IMAGE_HELP}}}
    if "objects" in properties:
        multipart["properties"]["objects"] = {"type": "array", "items": {"type": "string"},
                                              "description": properties["objects"]["description"]}
    required = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {**multipart, "required": required}},
        "application/json": {"schema": {**schema, "required": required}},
    }}}
