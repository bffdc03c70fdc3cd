"""A closed-loop load generator: N clients, each sending its next request as soon as its last one ends.

Timeline of one run: [warm-up][measurement window][drain]. Only requests that *finish* inside the
window count (throughput = successes in the window / window length; latency percentiles over them).
When the window closes no new request is sent, and the ones in flight are awaited (up to
`drain_timeout_s`) so that a slow server's backlog does not spill into the next measurement.

Requests are taken in order from one shared sequence (the workload mix), so every system sees the same
requests in the same order; bodies are pre-built, so the generator's CPU cost per request is small.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.workload import Request

Hook = Callable[[], Awaitable[None]]


@dataclass
class Sample:
    task: str
    start: float  # seconds since the run started
    end: float
    status: int  # HTTP status; 0 when the request failed without one (see `error`)
    max_new_tokens: int = 0  # what the request asked for
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    concurrency: int
    warmup_s: float
    duration_s: float
    completed: int  # successes inside the window
    requests_per_s: float
    latency_ms: dict[str, float]  # p50, p90, p99, mean, max over the window's successes
    errors: dict[str, int]  # non-200 outcomes inside the window, by status (or exception name)
    per_task: dict[str, dict[str, float]]
    per_length: dict[str, dict[str, float]]  # by max_new_tokens asked for: completed, p50_ms, p90_ms
    token_mismatches: int  # successes whose reported completion_tokens differ from max_new_tokens
    sent: int
    abandoned: int  # still in flight when the drain timed out
    samples: list[Sample] = field(default_factory=list, repr=False)

    def to_json(self, with_samples: bool = False) -> dict[str, object]:
        data = asdict(self)
        if not with_samples:
            data.pop("samples")
        return data


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in latencies]
    return {
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else float("nan"),
        "max": max(ms) if ms else float("nan"),
    }


def _completion_tokens(body: bytes) -> int | None:
    """`usage.completion_tokens` (our server) or `completion_tokens` (the peers), if the body has it."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    value = usage.get("completion_tokens") if isinstance(usage, dict) else data.get("completion_tokens")
    return value if isinstance(value, int) else None


async def run_load(base_url: str, mix: list[Request], concurrency: int, warmup_s: float, duration_s: float,
                   *, start_index: int = 0, drain_timeout_s: float = 180.0, request_timeout_s: float = 600.0,
                   on_window_start: Hook | None = None, on_window_end: Hook | None = None) -> LoadResult:
    """Keep `concurrency` requests in flight for warmup_s + duration_s, drain, return the window's stats."""
    samples: list[Sample] = []
    next_index = start_index
    t0 = time.perf_counter()
    stop_at = warmup_s + duration_s
    wanted = {id(r): r.max_new_tokens for r in mix}

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def one(request: Request) -> None:
            start = time.perf_counter() - t0
            sample = Sample(request.task, start, start, 0, request.max_new_tokens)
            try:
                response = await client.post(request.path, content=request.body,
                                             headers={"content-type": request.content_type})
                sample.status = response.status_code
                if response.status_code == 200:
                    sample.completion_tokens = _completion_tokens(response.content)
            except httpx.HTTPError as exc:
                sample.error = type(exc).__name__
                await asyncio.sleep(0.05)  # a refused connection returns at once: don't spin
            sample.end = time.perf_counter() - t0
            samples.append(sample)
            if sample.status == 200 and sample.completion_tokens is not None:
                sample.error = None if sample.completion_tokens == wanted[id(request)] else "token_mismatch"

        async def client_loop() -> None:
            nonlocal next_index
            while time.perf_counter() - t0 < stop_at:
                request = mix[next_index % len(mix)]
                next_index += 1
                await one(request)

        async def hooks() -> None:
            await asyncio.sleep(warmup_s)
            if on_window_start:
                await on_window_start()
            await asyncio.sleep(max(0.0, stop_at - (time.perf_counter() - t0)))
            if on_window_end:
                await on_window_end()

        hook_task = asyncio.ensure_future(hooks())
        clients = [asyncio.ensure_future(client_loop()) for _ in range(concurrency)]
        await hook_task
        # The window is over: no client starts a new request; wait for the ones in flight.
        _done, pending = await asyncio.wait(clients, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    window = [s for s in samples if warmup_s <= s.end <= stop_at]
    ok = [s for s in window if s.status == 200]
    errors = Counter(str(s.status) if s.status else f"exception:{s.error}" for s in window if s.status != 200)
    per_task = {}
    for task in sorted({s.task for s in ok}):
        lat = [s.latency for s in ok if s.task == task]
        per_task[task] = {"completed": len(lat), "p50_ms": percentile([v * 1000 for v in lat], 50)}
    per_length = {}
    for length in sorted({s.max_new_tokens for s in ok}):
        ms = [s.latency * 1000 for s in ok if s.max_new_tokens == length]
        per_length[str(length)] = {"completed": len(ms), "p50_ms": percentile(ms, 50),
                                   "p90_ms": percentile(ms, 90)}
    return LoadResult(
        concurrency=concurrency,
        warmup_s=warmup_s,
        duration_s=duration_s,
        completed=len(ok),
        requests_per_s=len(ok) / duration_s,
        latency_ms=_latency_summary([s.latency for s in ok]),
        errors=dict(errors),
        per_task=per_task,
        per_length=per_length,
        token_mismatches=sum(s.error == "token_mismatch" for s in ok),
        sent=next_index - start_index,
        abandoned=len(pending),
        samples=samples,
    )
