"""What the peer servers share: arguments, the model (same preset and seed as ours), prompts, replies.

Every peer serves POST /v1/caption, /v1/vqa, /v1/detect and /v1/segment with the form fields our server
takes (`image`, `question`, `objects`, `language`, `max_new_tokens`) and answers
`{"text": ..., "completion_tokens": ...}` (the pipeline peer: text only): the generated text, not parsed
into boxes (our server does that extra work). Prompts are built exactly as ours builds them
(`benchmarks.workload.build_prefix`), and "<image>" + prefix through `PaliGemmaProcessor` gives token
for token the input our server feeds the model (checked by `python -m benchmarks.peers.common`).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable

# At module level: FastAPI resolves the handlers' annotations (strings, under `from __future__ import
# annotations`) in this module's namespace.
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from benchmarks.workload import build_prefix

TASK_PATHS = ("caption", "vqa", "detect", "segment")


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="bench", help="preset name (app.model.presets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="queue timeout, where the peer has one")
    return parser.parse_args()


def load(model: str, seed: int):
    """The model through the server's own loader: identical architecture, weights, dtype and tokenizer."""
    from app.model.loader import load_model
    from app.settings import Settings

    return load_model(Settings(model=model, seed=seed))


def prompt(task: str, question: str | None, objects: list[str] | str | None, language: str = "en") -> str:
    """The text to hand `PaliGemmaProcessor`: "<image>" + the task prefix."""
    fields = {"language": language}
    if question is not None:
        fields["question"] = question
    if objects is not None:
        fields["objects"] = " ; ".join(objects) if isinstance(objects, list) else objects
    return "<image>" + build_prefix(task, fields)


def open_image(data: bytes) -> Image.Image:
    """What tutorials do: let Pillow read the upload at full size, convert to RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def first_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position]
    return tokens


# run(image bytes, processor text, max_new_tokens) -> the reply. Called inline in `async def` handlers.
Runner = Callable[[bytes, str, int], dict[str, object]]


def task_app(title: str, run: Runner) -> FastAPI:
    """A FastAPI app serving the task paths with `run`."""
    app = FastAPI(title=title)
    add_task_routes(app, run)
    return app


def serve(create_app: Callable[[str, int], FastAPI], doc: str | None) -> None:
    """The peers' command line: parse the shared arguments, build the app, serve it."""
    import uvicorn

    args = parse_args((doc or "").split("\n\n")[0])
    uvicorn.run(create_app(args.model, args.seed), host=args.host, port=args.port)


def add_task_routes(app: FastAPI, run: Runner) -> None:
    """The four task endpoints plus GET /healthz on a FastAPI app, each calling `run` inline.

    Inline in `async def` handlers, as most tutorials write them: requests run strictly one at a time.
    (With plain `def` handlers FastAPI would run up to 40 `generate` calls at once in threads; on a CPU
    they only contend for the same cores, and on a GPU they would serialise on the device anyway.)
    """
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/caption")
    async def caption(image: UploadFile = File(...), language: str = Form("en"),
                      max_new_tokens: int = Form(64)) -> dict[str, object]:
        return run(await image.read(), prompt("caption", None, None, language), max_new_tokens)

    @app.post("/v1/vqa")
    async def vqa(image: UploadFile = File(...), question: str = Form(...), language: str = Form("en"),
                  max_new_tokens: int = Form(64)) -> dict[str, object]:
        return run(await image.read(), prompt("vqa", question, None, language), max_new_tokens)

    @app.post("/v1/detect")
    async def detect(image: UploadFile = File(...), objects: list[str] = Form(...),
                     max_new_tokens: int = Form(64)) -> dict[str, object]:
        return run(await image.read(), prompt("detect", None, objects), max_new_tokens)

    @app.post("/v1/segment")
    async def segment(image: UploadFile = File(...), objects: list[str] = Form(...),
                      max_new_tokens: int = Form(64)) -> dict[str, object]:
        return run(await image.read(), prompt("segment", None, objects), max_new_tokens)


def _self_check() -> None:
    """The processor's input ids and pixels equal the ones our server computes, for every task."""
    import torch

    from app.model.inputs import ImageTransform, PromptEncoder

    loaded = load("tiny", 0)
    encoder, transform = PromptEncoder.from_processor(loaded.processor), ImageTransform.from_processor(
        loaded.processor)
    image = Image.new("RGB", (500, 400), (90, 120, 200))
    for task, question, objects in (("caption", None, None), ("vqa", "what is  this?", None),
                                    ("detect", None, "cup ; spoon"), ("segment", None, "cat")):
        text = prompt(task, question, objects)
        encoded = loaded.processor(text=text, images=image, return_tensors="pt")
        assert encoded["input_ids"][0].tolist() == encoder.encode(text.removeprefix("<image>")), task
        assert torch.allclose(encoded["pixel_values"][0], transform(image), atol=1e-5), task
    print("ok: peers feed the model the same input ids and pixels as our server")


if __name__ == "__main__":
    _self_check()
