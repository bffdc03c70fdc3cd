"""transformers' `pipeline("image-text-to-text")` behind FastAPI: one pipeline call per request.

The pipeline is built from the same model object and processor our server loads (same preset, seed and
weights). It batches only lists handed to one call, so behind a web server it runs one request at a time.

    python -m benchmarks.peers.pipeline --port 8103 --model bench
"""

from __future__ import annotations

from fastapi import FastAPI
from transformers import pipeline

from benchmarks.peers.common import load, open_image, serve, task_app


def create_app(model_name: str, seed: int) -> FastAPI:
    loaded = load(model_name, seed)
    pipe = pipeline("image-text-to-text", model=loaded.model, processor=loaded.processor)

    def run(data: bytes, text: str, max_new_tokens: int) -> dict[str, object]:
        [result] = pipe(images=open_image(data), text=text, max_new_tokens=max_new_tokens,
                        generate_kwargs={"do_sample": False}, return_full_text=False)
        # The pipeline returns text only, and random weights' bytes do not re-tokenise to the same count:
        # no `completion_tokens`, so the load generator cannot check this peer's output length.
        return {"text": result["generated_text"]}

    return task_app("PaliGemma pipeline server", run)


if __name__ == "__main__":
    serve(create_app, __doc__)
