"""What our server's /metrics says about a measurement window: the difference of two scrapes.

Step rows and durations (by phase: prefill, decode), queue waits and times to first token are
histograms; the difference of their buckets, sums and counts between the window's start and end
describes only the window's steps and requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# name -> {labels (sorted tuple) -> value}; histogram samples keep their _bucket/_sum/_count names.
Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def scrape(base_url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(base_url + "/metrics")
    response.raise_for_status()
    samples: Scrape = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _total(scrape_: Scrape, name: str, **labels: str) -> float:
    return sum(value for key, value in scrape_.get(name, {}).items()
               if all(dict(key).get(k) == v for k, v in labels.items()))


def _delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return _total(after, name, **labels) - _total(before, name, **labels)


@dataclass
class Histogram:
    count: float
    total: float
    buckets: dict[str, float]  # upper bound ("le") -> observations at or below it, in the window

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


def histogram(before: Scrape, after: Scrape, name: str, **labels: str) -> Histogram:
    bounds = sorted({dict(key)["le"] for key in after.get(name + "_bucket", {})}, key=float)
    return Histogram(
        count=_delta(before, after, name + "_count", **labels),
        total=_delta(before, after, name + "_sum", **labels),
        buckets={le: _delta(before, after, name + "_bucket", le=le, **labels) for le in bounds},
    )


def distribution(hist: Histogram) -> dict[str, float]:
    """Observations per bucket (upper bound -> count in (previous bound, bound]), empty buckets left out;
    Prometheus' buckets are cumulative."""
    result = {}
    previous = 0.0
    for le, cumulative in hist.buckets.items():
        if cumulative - previous > 0:
            result[le] = cumulative - previous
        previous = cumulative
    return result


def window_summary(before: Scrape, after: Scrape) -> dict[str, object]:
    """The figures the report quotes about how the engine stepped during the window."""
    decode_rows = histogram(before, after, "paligemma_step_rows", phase="decode")
    prefill_rows = histogram(before, after, "paligemma_step_rows", phase="prefill")
    decode_time = histogram(before, after, "paligemma_step_duration_seconds", phase="decode")
    prefill_time = histogram(before, after, "paligemma_step_duration_seconds", phase="prefill")
    wait = histogram(before, after, "paligemma_queue_wait_seconds")
    first = histogram(before, after, "paligemma_time_to_first_token_seconds")
    return {
        "decode_steps": decode_rows.count,
        "mean_decode_rows": decode_rows.mean,
        "decode_rows_distribution": distribution(decode_rows),  # upper bound -> steps in its bucket
        "mean_decode_step_ms": decode_time.mean * 1000,
        "prefill_steps": prefill_rows.count,
        "mean_prefill_rows": prefill_rows.mean,
        "mean_prefill_step_ms": prefill_time.mean * 1000,
        # Seconds the worker spent inside model steps that ended in the window.
        "step_busy_s": decode_time.total + prefill_time.total,
        "mean_queue_wait_ms": wait.mean * 1000,
        "mean_time_to_first_token_ms": first.mean * 1000,
        "generated_tokens": _delta(before, after, "paligemma_generated_tokens_total"),
        "feature_cache_hits": _delta(before, after, "paligemma_feature_cache_hits_total"),
        "rejections": _delta(before, after, "paligemma_rejections_total"),
    }
