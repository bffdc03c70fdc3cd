"""`POST /v1/chat/completions`: the OpenAI chat API over PaliGemma, so existing OpenAI clients work.

A request is one user message holding one image (`image_url`: a data URL, or an http(s) URL of an
allowed host) and one text part: the PaliGemma prefix ("caption en", "detect cat ; dog",
"answer en what is this?"). The answer is the OpenAI chat completion (or, with `stream`, its chunks and
`data: [DONE]`); `message.content` is the model's raw output, and the boxes and masks parsed from it
ride along in the extra fields `detections` and `segments`. What PaliGemma cannot do (several images,
conversations, tools, n > 1, logprobs, stop strings, penalties) is a 400 that says so.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.bodies import image_input, parse_json
from app.api.deps import ServiceDep
from app.api.errors import ERROR_RESPONSES, request_id_of, service_error_body, validation_problem
from app.api.streaming import EVENT_STREAM, stream_job
from app.api.tasks import count_prompt_tokens, generate_response, job_for, until_disconnect
from app.engine.sampling_params import SamplingParams
from app.errors import InvalidRequest, NotFound, ServiceError, ValidationFailed
from app.serving.jobs import JobResult
from app.serving.service import InferenceService
from app.tasks import prompts
from app.tasks.prompts import PromptLimits, Task

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


class _Open(BaseModel):
    # OpenAI keeps adding optional fields; those that change nothing here pass.
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str = Field(description="A data URL (data:image/png;base64,...) or an http(s) URL of an allowed "
                                 "host.")


class ContentPart(_Open):
    type: str = Field(description="`image_url` or `text`.")
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Open):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    model: str | None = Field(None, description="The base's id or a loaded LoRA adapter's name (GET "
                                                "/v1/models). Without adapters, any name is the one model.")
    messages: list[Message] = Field(min_length=1)
    # As in OpenAI's API, null is allowed wherever a field is optional, and means the default.
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0,
                                      description="0 or null (the default here): greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="null: 1.")
    top_k: int | None = Field(None, ge=0, le=1_000_000,
                              description="An extension: sample from the k likeliest tokens (0 or null: "
                                          "all).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None

    def sampling(self) -> SamplingParams:
        default = SamplingParams()
        return SamplingParams(default.temperature if self.temperature is None else self.temperature,
                              default.top_p if self.top_p is None else self.top_p,
                              default.top_k if self.top_k is None else self.top_k, self.seed)

    def token_limit(self) -> tuple[int | None, str]:
        """The most tokens to generate, and the field the client gave it in (for messages)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage
    detections: list[Any] | None = Field(None, description="Boxes, when the output holds <loc> tokens.")
    segments: list[Any] | None = Field(None, description="Boxes and masks, when it holds <seg> tokens.")


# Fields that would change the answer in ways this server cannot honour, with why.
_UNSUPPORTED = {
    "tools": "tools and function calling are not supported: PaliGemma answers one prefix about one image",
    "tool_choice": "tools and function calling are not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "stop": "stop strings are not supported: PaliGemma ends its answer with <eos>",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio is not supported",
}
# Values of those fields (and of the penalties) that change nothing, so clients that send them pass;
# null always does. An empty list of stop strings (or of tools) asks for none.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "response_format": ({"type": "text"},), "stop": ([], ""), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "logit_bias": ({},),
}


def _refuse_unsupported(chat: ChatRequest) -> None:
    extra = chat.model_extra or {}
    for name in ("presence_penalty", "frequency_penalty", "response_format", *_UNSUPPORTED):
        value = extra.get(name)
        if value is not None and value not in _NEUTRAL.get(name, ()):
            why = _UNSUPPORTED.get(name, f"{name} is not supported (only its default is accepted)")
            raise InvalidRequest(why, param=name)
    if chat.n not in (None, 1):
        raise InvalidRequest("n must be 1: one completion per request", param="n")


def _image_and_prefix(chat: ChatRequest) -> tuple[str, str]:
    if len(chat.messages) != 1 or chat.messages[0].role != "user":
        raise InvalidRequest("send exactly one user message: PaliGemma answers one prefix about one image "
                             "and takes no system prompt or conversation history", param="messages")
    content = chat.messages[0].content
    parts = content if isinstance(content, list) else []
    images = [part.image_url for part in parts if part.type == "image_url"]
    texts = [part.text for part in parts if part.type == "text"]
    other = sorted({part.type for part in parts} - {"image_url", "text"})
    if other:
        raise InvalidRequest(f"content parts of type {', '.join(other)} are not supported; send one "
                             "image_url part and one text part", param="messages")
    if len(images) != 1 or images[0] is None:
        raise InvalidRequest(f"the message must hold exactly one image_url part (it holds {len(images)}): "
                             "PaliGemma takes one image per request", param="messages")
    if len(texts) != 1 or not texts[0]:
        raise InvalidRequest("the message must hold exactly one text part with the PaliGemma prefix, e.g. "
                             "\"caption en\", \"detect cat ; dog\" or \"answer en what is this?\"",
                             param="messages")
    return images[0].url, texts[0]


def adapter_for_model(service: InferenceService, model: str | None) -> str | None:
    """The adapter the `model` field names; None for the base. Without adapters any name is the base, as
    it always was (clients send names like "paligemma"); with them, a name that is neither the base's id
    nor a loaded adapter's is a 404, so a typo never quietly gets the base's answer."""
    if model is None or model == service.loaded.name or service.adapters is None:
        return None
    if not service.adapters.is_loaded(model):
        loaded = ", ".join(service.adapters.names) or "none"
        raise NotFound(f"model {model!r} is neither the base ({service.loaded.name!r}) nor a loaded adapter; "
                       f"loaded adapters: {loaded} (GET /v1/models lists them)", param="model")
    return model


def _completion(request: Request, service: InferenceService, result: JobResult) -> ChatCompletion:
    typed = generate_response(result, service)
    return ChatCompletion(
        id=_completion_id(request), created=int(time.time()), model=result.adapter or service.loaded.name,
        choices=[Choice(message=ChatMessage(content=result.text),
                        finish_reason="stop" if result.finished else "length")],
        usage=ChatUsage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens),
        detections=[d.model_dump(mode="json") for d in typed.detections] if typed.detections else None,
        segments=[s.model_dump(mode="json") for s in typed.segments] if typed.segments else None,
    )


def _completion_id(request: Request) -> str:
    return f"chatcmpl-{request_id_of(request.scope) or 'local'}"


def _data(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class ChunkEvents:
    """OpenAI's stream: `chat.completion.chunk` objects, a final one with finish_reason, `[DONE]`."""

    def __init__(self, request: Request, service: InferenceService, include_usage: bool, model: str):
        self.request = request
        self.service = service
        self.include_usage = include_usage
        self.model = model
        self.created = int(time.time())
        self.started = False

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": _completion_id(self.request), "object": "chat.completion.chunk",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    def delta(self, text: str) -> bytes:
        delta = {"content": text} if self.started else {"role": "assistant", "content": text}
        self.started = True
        return _data(self._chunk(delta))

    async def result(self, result: JobResult) -> bytes:
        count_prompt_tokens(self.request, result)
        whole = _completion(self.request, self.service, result)
        typed = {key: value for key in ("detections", "segments")
                 if (value := getattr(whole, key)) is not None}
        events = _data(self._chunk({}, whole.choices[0].finish_reason, **typed))
        if self.include_usage:
            events += _data({**self._chunk({}), "choices": [], "usage": whole.usage.model_dump()})
        return events + b"data: [DONE]\n\n"

    def error(self, error: ServiceError) -> bytes:
        body = service_error_body(error, request_id_of(self.request.scope))
        return _data(body) + b"data: [DONE]\n\n"


_STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {EVENT_STREAM: {}},
                   "description": "A chat completion; with `stream`, its chunks then `data: [DONE]`."}}


@router.post("/chat/completions", response_model=ChatCompletion, summary="OpenAI-compatible chat completions",
             responses=_STREAMED, response_model_exclude_none=True)
async def chat_completions(request: Request, service: ServiceDep) -> Any:
    payload = parse_json(await request.body(), "{\"model\": \"paligemma\", \"messages\": [...]}")
    try:
        chat = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        message, param = validation_problem(list(exc.errors()))
        raise ValidationFailed(message, param=param) from None
    _refuse_unsupported(chat)
    url, text = _image_and_prefix(chat)
    settings = service.settings
    prefix = prompts.raw_prompt(text, PromptLimits(settings.max_objects, settings.max_text_chars))
    limit, field = chat.token_limit()
    adapter = adapter_for_model(service, chat.model)
    job = job_for(request, service, Task.GENERATE, prefix, limit, chat.sampling(), adapter, field=field)
    image = image_input(url, service.image_sources)
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        stream = stream_job(lambda on_tokens: service.run(job, image, on_tokens), service.encoder,
                            ChunkEvents(request, service, include_usage, adapter or service.loaded.name))
        return await until_disconnect(request, stream)
    result: JobResult = await until_disconnect(request, service.run(job, image))
    count_prompt_tokens(request, result)
    return _completion(request, service, result)
