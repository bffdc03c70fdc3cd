"""The ceiling: the same model running the same requests in-process, with no HTTP and no queue.

Images are decoded and prompts encoded beforehand through the server's own functions
(`app.images.decode_image`, `ImageTransform`, `PromptEncoder`), then consecutive slices of the workload
sequence go through `ModelRunner.generate` as batches of a fixed size, back to back. So the work per
batch is what the server's worker does for a full batch of the same requests; only the serving (HTTP,
parsing, image decoding, queueing, batch formation) is missing.

Two modes, because the server's runner can reuse image features (a hash of the upload's bytes as the
key; one encoding per distinct image in a batch; a cache of recent images' features):

- `server_path`: the requests carry the keys the server computes and the runner has the server's
  feature cache size (PALIGEMMA_FEATURE_CACHE_SIZE, default 64): the work of `ours`, arranged as well
  as it can be (a session's questions stay together).
- `no_cache`: the same keys, feature cache size 0 (only requests about one image inside one batch share
  an encoding): the work of `ours_nocache`. At batch size 1 it encodes every image.

With a runner that has no feature reuse (older checkouts), one mode, `no_reuse`, is measured instead.

    python -m benchmarks.ceiling --model bench --batch-sizes 1,16 --duration 30

Runs in its own process (run.py starts it so): torch's thread pool then never competes with a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import Request, build_mix

SERVER_PATH = "server_path"
NO_CACHE = "no_cache"
NO_REUSE = "no_reuse"  # a runner without image keys: every image encoded


def _runner_reuses_features() -> bool:
    """Whether this checkout's ModelRunner takes image keys and a feature cache (it changes over time)."""
    from app.model.runner import ModelInput, ModelRunner

    fields = {f.name for f in dataclasses.fields(ModelInput)}
    return "image_key" in fields and "feature_cache_size" in inspect.signature(ModelRunner).parameters


def prepare(loaded, mix: list[Request], keyed: bool = False):
    """ModelInputs for the whole mix, through the server's image and prompt path (not timed).

    keyed: give each input the key the server gives it (`app.images.upload_key` of the upload).
    """
    from app.images import decode_image, upload_key
    from app.model.inputs import ImageTransform, PromptEncoder
    from app.model.runner import ModelInput
    from app.settings import Settings

    transform = ImageTransform.from_processor(loaded.processor)
    encoder = PromptEncoder.from_processor(loaded.processor)
    max_pixels = Settings().max_image_pixels
    pixels = {}
    inputs = []
    for request in mix:
        if request.image_key not in pixels:  # one tensor per distinct image: the mix repeats images
            decoded = decode_image(request.jpeg, max_pixels=max_pixels, min_side=transform.min_side)
            pixels[request.image_key] = transform(decoded.image)
        item = ModelInput(encoder.encode(request.prefix), pixels[request.image_key], request.max_new_tokens)
        if keyed:
            item = dataclasses.replace(item, image_key=upload_key(request.jpeg))
        inputs.append(item)
    return inputs


def measure(runner, inputs: list, batch_size: int, duration_s: float,
            min_batches: int = 3) -> dict[str, Any]:
    """Run consecutive batches of `batch_size` for about duration_s, after one warm-up batch."""
    from benchmarks.procs import CpuMeter

    # Warm-up (allocator, kernels, thread pool for this shape) on the sequence's last slice, so that a
    # feature cache it fills holds nothing the measured batches, from the start, will ask for soon.
    runner.generate(inputs[-batch_size:])
    meter = CpuMeter()
    times: list[float] = []
    requests = tokens = 0
    index = 0
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s or len(times) < min_batches:
        batch = [inputs[(index + i) % len(inputs)] for i in range(batch_size)]
        index += batch_size
        t = time.perf_counter()
        runner.generate(batch)
        times.append(time.perf_counter() - t)
        requests += batch_size
        tokens += sum(item.max_new_tokens for item in batch)
    busy = sum(times)
    return {
        "batch_size": batch_size,
        "batches": len(times),
        "requests": requests,
        "seconds": busy,
        "requests_per_s": requests / busy,
        "tokens_per_s": tokens / busy,
        "batch_ms_median": statistics.median(times) * 1000,
        "cpu": meter.stop(),  # other_cores: what other processes on the machine took meanwhile
    }


def run(model: str, seed: int, batch_sizes: list[int], duration_s: float, variants: int,
        modes: list[str]) -> dict[str, Any]:
    from app.model.loader import load_model
    from app.model.runner import ModelRunner
    from app.settings import Settings

    settings = Settings(model=model, seed=seed)
    loaded = load_model(settings)
    mix = build_mix(variants)
    reuse = _runner_reuses_features()
    if not reuse:
        modes = [NO_REUSE]
    inputs = prepare(loaded, mix, keyed=reuse)
    results = []
    for mode in modes:
        for size in batch_sizes:
            # A fresh runner per measurement: no features cached by an earlier one.
            if not reuse:
                runner = ModelRunner(loaded)
            else:
                runner = ModelRunner(loaded, settings.feature_cache_size if mode == SERVER_PATH else 0)
            results.append({"mode": mode, **measure(runner, inputs, size, duration_s)})
    return {"model": model, "seed": seed, "parameters": loaded.parameters, "dtype": str(loaded.dtype),
            "device": str(loaded.device), "feature_cache_size": settings.feature_cache_size,
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated, e.g. 1,16")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per batch size and mode")
    parser.add_argument("--variants", type=int, default=16, help="rounds of the workload mix")
    parser.add_argument("--modes", default=f"{SERVER_PATH},{NO_CACHE}", help="comma-separated")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    result = run(args.model, args.seed, [int(b) for b in args.batch_sizes.split(",")], args.duration,
                 args.variants, args.modes.split(","))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
