"""LitServe with its dynamic batching: one left-padded `generate` call per batch.

The LitAPI is written the way LitServe documents batching: `decode_request` turns one request into
(image, text, max_new_tokens), `batch` runs `PaliGemmaProcessor` over the list (left padding, as batched
generation needs), `predict` makes one `generate` call for the whole batch with the longest request's
`max_new_tokens`, `unbatch` cuts every row to its own length, `encode_response` decodes it.
`max_batch_size` and `batch_timeout` are LitServe's own batch settings (`benchmarks.run`'s
--litserve-batch-size and --litserve-batch-wait-ms: 16 and 5 ms unless told); our server has no
counterpart any more (its requests join a running batch at the next model step). `timeout` (how long a
request may wait in LitServe's queue) is our PALIGEMMA_REQUEST_TIMEOUT_S.

Routing: LitServe's documented way to serve several endpoints is one LitAPI per path, but each LitAPI
gets its own inference worker process and model copy, so four task endpoints would split every batch four
ways (and four model processes would fight over the same cores). The four task paths here are therefore
LitServe's own request handler (the one its `api_path` route uses: queue to the batching worker, wait,
respond), registered for each path with the task taken from the path, all feeding ONE LitAPI, one worker
and one model, so batches mix tasks the way ours do.

    python -m benchmarks.peers.litserve_peer --port 8102 --model bench
"""

from __future__ import annotations

from typing import Any

import litserve as ls
import torch
from fastapi import Request  # module level: FastAPI resolves the endpoint's string annotations here
from litserve.server import RegularRequestHandler

from benchmarks.peers.common import TASK_PATHS, first_eos, load, open_image, parse_args, prompt


class PaliGemmaAPI(ls.LitAPI):
    def __init__(self, model: str, seed: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.model_name = model
        self.seed = seed

    def setup(self, device: str) -> None:
        loaded = load(self.model_name, self.seed)
        self.model = loaded.model
        self.processor = loaded.processor  # its tokenizer pads on the left (set by the loader)
        self.eos = set(loaded.eos_token_ids)

    def decode_request(self, request: Any) -> tuple[Any, str, int]:
        # A dict from the task paths; the form itself (with a `task` field) from LitServe's own api_path.
        image = request["image"]
        data = image if isinstance(image, bytes) else image.file.read()
        objects = request.getlist("objects") if hasattr(request, "getlist") else request.get("objects")
        language = request.get("language", "en")
        text = prompt(request["task"], request.get("question"), objects or None, language)
        return open_image(data), text, int(request.get("max_new_tokens", 64))

    def batch(self, inputs: list[tuple[Any, str, int]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        images, texts, limits = zip(*inputs, strict=True)
        encoded = self.processor(text=list(texts), images=list(images), padding="longest",
                                 return_tensors="pt")
        encoded.pop("labels", None)  # training labels; generate does not take them
        return dict(encoded), list(limits)

    def predict(self, x: tuple[dict[str, torch.Tensor], list[int]]) -> list[list[int]]:
        encoded, limits = x
        length = encoded["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.model.generate(**encoded, max_new_tokens=max(limits), do_sample=False)
        rows = output[:, length:].tolist()
        return [first_eos(row[:limit], self.eos) for row, limit in zip(rows, limits, strict=True)]

    def unbatch(self, output: list[list[int]]) -> list[list[int]]:
        return output

    def encode_response(self, output: list[int]) -> dict[str, object]:
        text = self.processor.decode(output, skip_special_tokens=True)
        return {"text": text, "completion_tokens": len(output)}


class TaskHandler(RegularRequestHandler):
    """LitServe's handler for one task path: the form becomes a plain dict (bytes pickle cheaply)."""

    def __init__(self, lit_api: ls.LitAPI, server: ls.LitServer, task: str):
        super().__init__(lit_api, server)
        self.task = task

    async def _prepare_request(self, request, request_type) -> dict[str, Any]:
        form = await request.form()
        payload: dict[str, Any] = {"task": self.task, "image": await form["image"].read()}
        for name in ("question", "language", "max_new_tokens"):
            if name in form:
                payload[name] = form[name]
        if "objects" in form:
            payload["objects"] = form.getlist("objects")
        return payload


def build_server(args) -> ls.LitServer:
    api = PaliGemmaAPI(args.model, args.seed, max_batch_size=args.max_batch_size,
                       batch_timeout=args.batch_wait_ms / 1000, api_path="/v1/predict")
    server = ls.LitServer(api, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                          workers_per_device=1, timeout=args.timeout_s)
    for task in TASK_PATHS:
        server.app.add_api_route(f"/v1/{task}", _endpoint(TaskHandler(api, server, task)), methods=["POST"])
    return server


def _endpoint(handler: TaskHandler):
    async def endpoint(request: Request):
        return await handler.handle_request(request, Request)

    return endpoint


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    server = build_server(args)
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main()
