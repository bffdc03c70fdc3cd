"""How long preparing a 12-megapixel JPEG takes, next to how long the model takes per batch.

Our server prepares images off the model worker (PALIGEMMA_PREPARE_WORKERS threads) with
`app.images.decode_image(data, max_pixels=..., min_side=224)` (libjpeg decodes at 1/2..1/8 scale when
the image is large enough) and `ImageTransform` (squash to 224 x 224, normalise). If preparing a batch's
images took about as long as the model's work on them, the model would wait for images. The model's
work is timed through the server's step engine (`benchmarks.ceiling.EngineDriver`): a burst of requests
submitted together, stepped until all have finished. For comparison, the tutorial path (Pillow decodes
at full size, then `PaliGemmaProcessor`'s image processor) is timed too.

    python -m benchmarks.image_prep [--model bench] [--batch-size 16] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from benchmarks import report
from benchmarks.workload import TWELVE_MP, build_mix, skimage_available


def run(model: str, batch_size: int, repeats: int) -> dict[str, float]:
    from app.engine.runner import RowInput
    from app.images import decode_image
    from app.model.inputs import ImageTransform, PromptEncoder
    from app.model.loader import load_model
    from app.settings import Settings
    from app.tasks.prompts import Task
    from benchmarks.ceiling import EngineDriver, Prepared

    settings = Settings(model=model, max_batch_size=max(batch_size, 1))
    loaded = load_model(settings)
    transform = ImageTransform.from_processor(loaded.processor)
    encoder = PromptEncoder.from_processor(loaded.processor)
    mix = build_mix(variants=1, photos="skimage" if skimage_available() else "synthetic")
    jpeg = next(r.jpeg for r in mix if r.image_key.startswith("coffee_12mp"))
    max_pixels = Settings().max_image_pixels

    def server_path():
        return transform(decode_image(jpeg, max_pixels=max_pixels, min_side=transform.min_side).image)

    def tutorial_path():
        from benchmarks.peers.common import open_image

        return loaded.processor.image_processor(open_image(jpeg), return_tensors="pt")["pixel_values"]

    from benchmarks.procs import CpuMeter

    meter = CpuMeter()  # the machine may be shared: record what other processes took meanwhile
    prep_ms = report.median_ms(server_path, repeats)
    tutorial_ms = report.median_ms(tutorial_path, max(3, repeats // 3))

    pixels = server_path()
    # Feature cache off and no image keys: every burst encodes every image, as uploads of different
    # photos would need.
    driver = EngineDriver(loaded, settings.model_copy(update={"feature_cache_size": 0}))
    requests = mix[:batch_size]
    batch = [Prepared(RowInput(encoder.encode(r.prefix), pixels), r.max_new_tokens, Task(r.task))
             for r in requests]
    batch_ms = report.median_ms(lambda: driver.run_batch(batch), 3)
    one_ms = report.median_ms(lambda: driver.run_batch(batch[:1]), 3)
    return {
        "jpeg_bytes": len(jpeg),
        "prep_ms": prep_ms,
        "tutorial_prep_ms": tutorial_ms,
        "batch_size": batch_size,
        "batch_ms": batch_ms,
        "batch_max_new_tokens": max(r.max_new_tokens for r in requests),
        "batch_1_ms": one_ms,
        "batch_1_max_new_tokens": requests[0].max_new_tokens,
        "other_cores": meter.stop()["other_cores"],
    }


def render(result: dict[str, float], model: str, workers: int) -> str:
    size = f"{TWELVE_MP[0]}x{TWELVE_MP[1]}"
    full_batch_prep = result["prep_ms"] * result["batch_size"] / workers
    return "\n".join([
        "## Image preparation vs model time (`python -m benchmarks.image_prep`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}: a {size} JPEG "
        f"({result['jpeg_bytes'] / 1e6:.1f} MB) prepared for the `{model}` model, median of repeated runs, "
        f"one thread (other processes took {result['other_cores']:.2f} of the 2 cores meanwhile):",
        "",
        "| step | ms |",
        "|---|---|",
        f"| server path: decode_image(min_side=224, JPEG draft) + ImageTransform | {result['prep_ms']:.1f} |",
        f"| tutorial path: Pillow full decode + PaliGemmaProcessor image processor | "
        f"{result['tutorial_prep_ms']:.1f} |",
        f"| model: {result['batch_size']:.0f} requests submitted together to the step engine, until all "
        f"finished (max_new_tokens up to {result['batch_max_new_tokens']:.0f}) | {result['batch_ms']:.0f} |",
        f"| model: 1 request alone (max_new_tokens {result['batch_1_max_new_tokens']:.0f}) | "
        f"{result['batch_1_ms']:.0f} |",
        "",
        f"Preparing a whole batch of {result['batch_size']:.0f} such images on {workers} prepare threads "
        f"takes about {full_batch_prep:.0f} ms, {full_batch_prep / result['batch_ms']:.0%} of the batch's "
        "model time: image preparation "
        + ("keeps up with the model (and runs beside it, off the worker)."
           if full_batch_prep < result["batch_ms"]
           else "would be the bottleneck for a stream of 12 MP uploads.")
        + " On a CPU the prepare threads and the model share the same cores, so this time is not free; "
        "on a GPU host it overlaps with the GPU's work.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prepare-workers", type=int, default=2, help="our PALIGEMMA_PREPARE_WORKERS")
    report.add_section_arguments(parser, "image_prep", quiet_wait_s=120.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    result = run(args.model, args.batch_size, args.repeats)
    report.publish(args, "image_prep", render(result, args.model, args.prepare_workers))


if __name__ == "__main__":
    main()
