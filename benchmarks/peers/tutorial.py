"""The tutorial server: FastAPI + uvicorn, one `model.generate` per request through `PaliGemmaProcessor`.

This is how the model cards and most blog posts serve PaliGemma: read the upload with Pillow, run the
processor, call `generate`, decode; inline in `async def` handlers, so one request at a time.

    python -m benchmarks.peers.tutorial --port 8101 --model bench
"""

from __future__ import annotations

import torch
from fastapi import FastAPI

from benchmarks.peers.common import first_eos, load, open_image, serve, task_app


def create_app(model_name: str, seed: int) -> FastAPI:
    loaded = load(model_name, seed)
    model, processor = loaded.model, loaded.processor
    eos = set(loaded.eos_token_ids)

    def run(data: bytes, text: str, max_new_tokens: int) -> dict[str, object]:
        inputs = processor(text=text, images=open_image(data), return_tensors="pt")
        inputs.pop("labels", None)  # the processor adds training labels; generate does not take them
        # The processor's tensors are on the CPU and its pixels float32: move them to the model (on a GPU,
        # bfloat16); BatchFeature.to casts only the floating-point ones, the token ids stay integers.
        inputs = inputs.to(model.device, dtype=model.dtype)
        length = inputs["input_ids"].shape[-1]
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = first_eos(output[0, length:].tolist(), eos)
        return {"text": processor.decode(tokens, skip_special_tokens=True), "completion_tokens": len(tokens)}

    return task_app("PaliGemma tutorial server", run)


if __name__ == "__main__":
    serve(create_app, __doc__)
