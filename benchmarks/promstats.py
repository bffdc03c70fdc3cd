"""What our server's /metrics says about a measurement window: the difference of two scrapes.

Batch sizes, queue waits and per-batch inference times are histograms; the difference of their
buckets, sums and counts between the window's start and end describes only the window's batches.
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

    def share_at_most(self, bound: str) -> float:
        return self.buckets.get(bound, float("nan")) / self.count if self.count else float("nan")


def histogram(before: Scrape, after: Scrape, name: str) -> Histogram:
    bounds = sorted({dict(key)["le"] for key in after.get(name + "_bucket", {})}, key=float)
    return Histogram(
        count=_delta(before, after, name + "_count"),
        total=_delta(before, after, name + "_sum"),
        buckets={le: _delta(before, after, name + "_bucket", le=le) for le in bounds},
    )


def window_summary(before: Scrape, after: Scrape) -> dict[str, object]:
    """The figures the report quotes about how the server batched during the window."""
    batch = histogram(before, after, "paligemma_batch_size")
    wait = histogram(before, after, "paligemma_queue_wait_seconds")
    inference = histogram(before, after, "paligemma_inference_duration_seconds")
    # Bucket counts are cumulative: the share of batches in (a, b] is F(b) - F(a).
    distribution = {}
    previous = 0.0
    for le, cumulative in batch.buckets.items():
        if cumulative - previous > 0:
            distribution[le] = cumulative - previous
        previous = cumulative
    return {
        "batches": batch.count,
        "mean_batch_size": batch.mean,
        "batch_size_distribution": distribution,  # upper bound -> batches in the bucket ending there
        "mean_queue_wait_ms": wait.mean * 1000,
        "queue_wait_at_most_100ms": wait.share_at_most("0.1"),
        "mean_inference_ms_per_batch": inference.mean * 1000,
        "inference_busy_s": inference.total,  # seconds the worker spent in batches during the window
        "feature_cache_hits": _delta(before, after, "paligemma_feature_cache_hits_total"),
        "rejections": _delta(before, after, "paligemma_rejections_total"),
    }
