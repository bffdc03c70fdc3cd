"""Reading a task endpoint's body, multipart or JSON, into its `protocol` model and the image it carries.

Both forms are held to the same rules: every field must be one the endpoint takes (an unknown one is a
422 that lists the fields), each field comes once (`objects` may repeat in multipart), exactly one
image. In multipart the image is normally a file field; a text `image` field is read like the JSON
form (base64, a data URL or an allowed URL), so a client that sends a string gets it used, not refused.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.api.errors import validation_problem
from app.api.protocol import TaskBody
from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from app.image_sources import ImageSources
from app.serving.jobs import ImageInput

Body = TypeVar("Body", bound=TaskBody)

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"  # a form without files: the image as base64 or a URL
JSON = "application/json"
_REPEATABLE = frozenset({"objects"})
MAX_JSON_DEPTH = 32  # the deepest body of this API (a chat completion's image URL) is 6 levels deep


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_task_body(request: Request, model: type[Body], max_image_bytes: int,
                         sources: ImageSources) -> tuple[Body, ImageInput]:
    """The endpoint's fields and its image: the upload, or what was sent in its place (base64, a data
    URL, an image URL), read through `sources` once the request is admitted."""
    kind = media_type(request)
    if kind in (MULTIPART, URLENCODED):
        values, image = await _from_multipart(request, model, max_image_bytes)
    elif kind == JSON or kind.endswith("+json"):
        values, image = await _from_json(request)
    else:
        raise UnsupportedMediaType(
            f"send the request as multipart/form-data (curl -F image=@photo.jpg ...) or as application/json "
            f"({{\"image\": \"<base64>\", ...}}); got Content-Type {kind or 'none'!r}")
    _refuse_unknown(values, model, request.url.path)
    if image is None or image == "":
        raise ValidationFailed(
            "`image` is required: a file field in multipart (curl -F image=@photo.jpg) or, in JSON, base64, "
            "a data URL or an allowed http(s) URL", param="image")
    try:
        body = model.model_validate(values)
    except ValidationError as exc:
        message, param = validation_problem(list(exc.errors()))
        raise ValidationFailed(message, param=param) from None
    if isinstance(image, bytes):
        return body, ImageInput(image)
    return body, image_input(image, sources)


def image_input(value: str, sources: ImageSources) -> ImageInput:
    """What a client sent in place of an image file (base64, a data URL, an image URL), read through
    `sources` when the service gets to it."""
    return ImageInput(loader=lambda: sources.load(value), remote=sources.is_url(value))


async def _from_multipart(request: Request, model: type[TaskBody],
                          max_image_bytes: int) -> tuple[dict[str, object], bytes | str | None]:
    form = await request.form()
    for name, value in form.multi_items():
        if name not in model.model_fields and isinstance(value, UploadFile):
            raise ValidationFailed(f"`{name}` is not a field of {request.url.path}: the image goes in a "
                                   "field named `image` (curl -F image=@photo.jpg)", param=name)
    values: dict[str, object] = {}
    image: bytes | str | None = None
    images = 0
    for name, value in form.multi_items():
        if name == "image":
            images += 1
            if images > 1:
                raise InvalidRequest("send one image per request: the body has more than one `image` field",
                                     param="image")
            image = await _read_upload(value, max_image_bytes) if isinstance(value, UploadFile) else value
            continue
        if isinstance(value, UploadFile):
            raise InvalidRequest(f"`{name}` must be a text field, not a file", param=name)
        if name in _REPEATABLE:
            repeated = values.setdefault(name, [])
            assert isinstance(repeated, list)
            repeated.append(value)
        elif name in values:
            raise InvalidRequest(f"`{name}` is given more than once; send it once", param=name)
        else:
            values[name] = value
    return values, image


def parse_json(raw: bytes, example: str) -> object:
    """The JSON value of a body, refused (400) when it is not JSON or nests deeper than MAX_JSON_DEPTH:
    no field of this API needs more than a few levels, and a body nested a thousand deep (2 KB) would
    otherwise exhaust the parser's recursion. `example` is a body to suggest in the message."""
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON ({exc}); send a JSON object such as {example}"
                             ) from None
    if _depth(payload) > MAX_JSON_DEPTH:
        raise _too_deep()
    return payload


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH:  # past the limit the answer is known: stop walking
            stack.extend((child, level + 1) for child in children)
    return deepest


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects, "
                          "the most this server reads; no field of this API needs more than a few: send the "
                          "fields the endpoint documents")


async def _from_json(request: Request) -> tuple[dict[str, object], bytes | str | None]:
    payload = parse_json(await request.body(), "{\"image\": \"<base64>\", \"max_new_tokens\": 32}")
    if not isinstance(payload, dict):
        raise ValidationFailed("the JSON body must be an object of fields, e.g. {\"image\": \"<base64>\"}")
    image = payload.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise ValidationFailed("`image` must be a string in JSON: base64, a data URL or an allowed http(s) "
                               "URL", param="image")
    return payload, image


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the image is over {limit} bytes (PALIGEMMA_MAX_IMAGE_BYTES); send a smaller "
                              "or more compressed image", param="image")
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    return data


def _refuse_unknown(values: dict[str, object], model: type[TaskBody], path: str) -> None:
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        fields = ", ".join(model.model_fields)
        raise ValidationFailed(f"`{unknown[0]}` is not a field of {path}; its fields are: {fields}",
                               param=unknown[0])
