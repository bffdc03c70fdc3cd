"""The ceiling: the server's own step engine in-process, N requests always in flight, no HTTP.

The worker side of `python -m app`, driven in the calling thread: `EngineCore.step_once()` over the
`Scheduler` and `ModelStepRunner` the server builds from the same settings (`runner_config`: KV-cache
rows, prompt and token caps, feature cache; the prefill token budget), each finished request finished as
the server finishes it (`app.serving.finishing.read_output`: text, parsed boxes), here in the same
thread. No HTTP, no asyncio, no admission queue, and no image decoding while it runs: images and prompts
are prepared beforehand through the server's own functions (`decode_image`, `ImageTransform`,
`PromptEncoder`, `upload_key`).

Steady state at N in flight: N requests are submitted; whenever one finishes, the next request of the
workload sequence is submitted at once (it joins at the next step, the earliest a request reaching the
server's engine could). With N above the rows, the rest wait in the scheduler, as in the server. After a
warm-up, the requests finishing inside the window count: req/s, tokens/s (tokens computed in the
window), in-process latency, and the engine's own step timings (decode and prefill: time and rows, from
the same `EngineObserver` hooks that feed the server's /metrics).

Two modes, because the runner reuses image features (one encoding per distinct image in a prefill, and a
cache of recent images' features keyed by a hash of the upload):
- `server_path`: the server's feature cache size (PALIGEMMA_FEATURE_CACHE_SIZE, default 64): `ours`.
- `no_cache`: feature cache size 0: `ours_nocache` (requests about one image share an encoding only when
  they are prefilled in the same step).

    python -m benchmarks.ceiling --model bench --concurrency 1,4,16,64 --duration 30

Runs in its own process (run.py starts it so): torch's thread pool then never competes with a server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine.core import EngineCore, StepEvents
from app.engine.observer import NullObserver
from app.engine.runner import ModelStepRunner, RowInput
from app.engine.scheduler import Scheduler, Sequence
from app.model.loader import LoadedModel
from app.settings import Settings
from app.tasks.prompts import Task
from benchmarks.loadgen import percentile
from benchmarks.report import fmt
from benchmarks.workload import PHOTO_SOURCES, Request, build_mix, skimage_available

SERVER_PATH = "server_path"
NO_CACHE = "no_cache"
MODES = (SERVER_PATH, NO_CACHE)


@dataclass(frozen=True)
class Prepared:
    """One request of the workload, ready for the engine."""

    row: RowInput
    max_new_tokens: int
    task: Task


def prepare(loaded: LoadedModel, mix: list[Request]) -> list[Prepared]:
    """The whole mix through the server's image and prompt path (not timed), keyed as the server keys
    uploads (a hash of the bytes), so the feature cache sees what it sees in the server."""
    from app.images import decode_image, upload_key
    from app.model.inputs import ImageTransform, PromptEncoder

    transform = ImageTransform.from_processor(loaded.processor)
    encoder = PromptEncoder.from_processor(loaded.processor)
    max_pixels = Settings.model_fields["max_image_pixels"].default
    pixels = {}
    prepared = []
    for request in mix:
        if request.image_key not in pixels:  # one tensor per distinct image: the mix repeats images
            decoded = decode_image(request.jpeg, max_pixels=max_pixels, min_side=transform.min_side)
            pixels[request.image_key] = transform(decoded.image)
        row = RowInput(encoder.encode(request.prefix), pixels[request.image_key], upload_key(request.jpeg))
        prepared.append(Prepared(row, request.max_new_tokens, Task(request.task)))
    return prepared


class StepRecorder(NullObserver):
    """The engine's observer hooks, kept with the time each call came: (time, phase, rows, seconds)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, str, int, float]] = []
        self.token_counts: list[tuple[float, int]] = []

    def step(self, phase: str, rows: int, seconds: float) -> None:
        self.steps.append((time.perf_counter(), phase, rows, seconds))

    def tokens(self, label: str, adapter: str, count: int) -> None:
        self.token_counts.append((time.perf_counter(), count))


class EngineDriver:
    """The server's worker loop and model runner, built from `settings` as `InferenceService` builds them,
    stepped in the calling thread. A request that fails stops the benchmark (it must not be counted)."""

    def __init__(self, loaded: LoadedModel, settings: Settings):
        from app.engine.faults import is_out_of_memory, is_unrecoverable
        from app.model.inputs import PromptEncoder
        from app.serving.service import runner_config

        self.loaded = loaded
        self.settings = settings
        self.runner = ModelStepRunner(loaded, runner_config(settings))
        started = time.perf_counter()
        self.runner.capture_graphs()  # what the server's warm-up does; nothing on the CPU
        self.capture_s = time.perf_counter() - started
        self.scheduler = Scheduler(settings.max_batch_size, settings.prefill_tokens)
        self.recorder = StepRecorder()
        self.encoder = PromptEncoder.from_processor(loaded.processor)
        self.loop = EngineCore(self.scheduler, self.runner, self._post, self.recorder, is_out_of_memory,
                               is_unrecoverable)
        self.tasks: dict[int, Task] = {}  # request id -> task, to finish its output
        self.stop_tokens = frozenset(loaded.eos_token_ids)

    def _post(self, events: StepEvents) -> None:
        from app.serving.finishing import read_output

        if events.fatal is not None:
            raise RuntimeError(f"the engine failed: {events.fatal!r}")
        if events.failed:
            raise RuntimeError(f"{len(events.failed)} requests failed: {events.failed[0][1]}")
        for seq in events.finished:  # what the server's thread pool does with a finished request
            read_output(self.encoder, self.tasks.pop(seq.request_id), seq.output_tokens)

    def submit(self, item: Prepared) -> Sequence:
        seq = Sequence(len(item.row.input_ids), item.max_new_tokens, self.stop_tokens, item.row,
                       item.task.value, time.monotonic())
        self.tasks[seq.request_id] = item.task
        self.loop.submit(seq)
        return seq

    def run_batch(self, items: list[Prepared]) -> list[Sequence]:
        """Submit every item at once and step until all have finished (a burst through the engine)."""
        seqs = [self.submit(item) for item in items]
        self.loop.run_until_idle()
        return seqs

    def drop(self, seqs: list[Sequence]) -> None:
        """Cancel unfinished requests (their rows are freed at the next step) and take that step."""
        for seq in seqs:
            if not seq.done:
                seq.cancel_reason = "benchmark window over"
                self.tasks.pop(seq.request_id, None)
        self.loop.run_until_idle()


def steady_state(driver: EngineDriver, items: list[Prepared], concurrency: int, warmup_s: float,
                 duration_s: float, start: int = 0) -> dict[str, Any]:
    """Keep `concurrency` requests in flight for warmup_s + duration_s; the window's figures.

    `next_index` in the result is where the workload sequence stopped (the next measurement goes on
    from there, as the load generator does)."""
    from benchmarks.procs import CpuMeter

    recorder = driver.recorder
    in_flight: list[tuple[Sequence, float]] = []
    index = start

    def submit_next() -> None:
        nonlocal index
        in_flight.append((driver.submit(items[index % len(items)]), time.perf_counter()))
        index += 1

    for _ in range(concurrency):
        submit_next()
    window_start = time.perf_counter() + warmup_s
    window_end = window_start + duration_s
    # The machine may be shared: what other processes took during the window (or, when one step spans
    # the whole window, during the warm-up and the window).
    whole, meter = CpuMeter(), None
    latencies: list[float] = []
    while (now := time.perf_counter()) < window_end:
        if meter is None and now >= window_start:
            meter = CpuMeter()
        if not driver.loop.step_once():
            raise RuntimeError("the engine stopped")
        now = time.perf_counter()
        done = [(seq, started) for seq, started in in_flight if seq.done]
        if not done:
            continue
        in_flight = [(seq, started) for seq, started in in_flight if not seq.done]
        for _seq, started in done:
            if window_start <= now <= window_end:
                latencies.append(now - started)
            submit_next()
    cpu = (meter or whole).stop()
    driver.drop([seq for seq, _ in in_flight])

    def inside(t: float) -> bool:
        return window_start <= t <= window_end

    steps = [(phase, rows, seconds) for t, phase, rows, seconds in recorder.steps if inside(t)]
    tokens = sum(count for t, count in recorder.token_counts if inside(t))
    recorder.steps.clear()
    recorder.token_counts.clear()
    ms = [v * 1000 for v in latencies]
    return {
        "concurrency": concurrency,
        "rows": driver.settings.max_batch_size,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "completed": len(latencies),
        "requests_per_s": len(latencies) / duration_s,
        "tokens_per_s": tokens / duration_s,
        "latency_ms": {"p50": percentile(ms, 50), "p90": percentile(ms, 90)},
        "decode": step_summary([s for s in steps if s[0] == "decode"]),
        "prefill": step_summary([s for s in steps if s[0] == "prefill"]),
        # Share of the window the engine spent inside model steps (the rest: its own bookkeeping).
        "busy": sum(seconds for _, _, seconds in steps) / duration_s,
        "cpu": cpu,
        "next_index": index,
    }


def step_summary(steps: list[tuple[str, int, float]]) -> dict[str, Any]:
    """Count, mean rows and step times of one phase's steps, also by row count (as JSON keys)."""
    if not steps:
        return {"steps": 0, "rows_mean": None, "ms_median": None, "ms_mean": None, "by_rows": {}}
    ms = [seconds * 1000 for _, _, seconds in steps]
    by_rows: dict[str, dict[str, float]] = {}
    for rows in sorted({rows for _, rows, _ in steps}):
        times = [seconds * 1000 for _, r, seconds in steps if r == rows]
        by_rows[str(rows)] = {"steps": len(times), "ms_median": statistics.median(times)}
    return {"steps": len(steps), "rows_mean": sum(rows for _, rows, _ in steps) / len(steps),
            "ms_median": statistics.median(ms), "ms_mean": sum(ms) / len(ms), "by_rows": by_rows}


def run(model: str, seed: int, concurrency: list[int], rows: int, duration_s: float, warmup_s: float,
        variants: int, modes: list[str], photos: str) -> dict[str, Any]:
    from app.model.loader import load_model

    settings = Settings(model=model, seed=seed, max_batch_size=rows)
    loaded = load_model(settings)
    items = prepare(loaded, build_mix(variants, photos=photos))
    results = []
    for mode in modes:
        cache = settings.feature_cache_size if mode == SERVER_PATH else 0
        # A fresh engine per mode and level: no features cached by an earlier measurement.
        for n in concurrency:
            driver = EngineDriver(loaded, settings.model_copy(update={"feature_cache_size": cache}))
            row = steady_state(driver, items, n, warmup_s, duration_s)
            row.pop("next_index")
            results.append({"mode": mode, "feature_cache_size": cache, **row})
            print(f"[ceiling] {mode} N={n}: {row['requests_per_s']:.2f} req/s, decode step "
                  f"{fmt(row['decode']['ms_median'], 1)} ms over {fmt(row['decode']['rows_mean'], 1)} rows "
                  f"(other processes {row['cpu']['other_cores']:.2f} cores)", flush=True)
    return {"model": model, "seed": seed, "parameters": loaded.parameters, "dtype": str(loaded.dtype),
            "device": str(loaded.device), "rows": rows, "prefill_tokens": settings.prefill_tokens,
            "feature_cache_size": settings.feature_cache_size, "photos": photos, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", default="1,4,16,64", help="requests in flight, comma-separated")
    parser.add_argument("--rows", type=int, default=Settings.model_fields["max_batch_size"].default,
                        help="KV-cache rows (PALIGEMMA_MAX_BATCH_SIZE; default: the server's default)")
    parser.add_argument("--duration", type=float, default=30.0, help="window per level and mode, s")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up before each window, s")
    parser.add_argument("--variants", type=int, default=16, help="rounds of the workload mix")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--photos", choices=PHOTO_SOURCES,
                        default="skimage" if skimage_available() else "synthetic")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    result = run(args.model, args.seed, [int(n) for n in args.concurrency.split(",")], args.rows,
                 args.duration, args.warmup, args.variants, args.modes.split(","), args.photos)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
