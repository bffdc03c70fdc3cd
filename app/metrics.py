"""Prometheus metrics, all prefixed `paligemma_`, in a registry owned by one app instance.

A registry per app (not the process-global default) lets tests build several apps in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.engine.batcher import BatchObserver

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(BatchObserver):
    def __init__(self) -> None:
        # `*_created` timestamps double the output and no dashboard reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("paligemma_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("paligemma_request_duration_seconds",
                                          "Time from a task request's arrival to its response.", ["endpoint"],
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("paligemma_queue_wait_seconds",
                                    "Time a request waited in the queue before its batch started.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("paligemma_inference_duration_seconds",
                                   "Time the model worker spent on one batch.", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.batch_size = Histogram("paligemma_batch_size", "Requests per batch run by the model.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth_gauge = Gauge("paligemma_queue_depth",
                                       "Requests admitted and waiting for the model (prepared or queued).",
                                       registry=r)
        self.generated_tokens = Counter("paligemma_generated_tokens", "Tokens generated, by endpoint.",
                                        ["endpoint"], registry=r)
        self.prompt_tokens = Counter("paligemma_prompt_tokens", "Prompt tokens (image tokens included).",
                                     ["endpoint"], registry=r)
        self.rejections = Counter("paligemma_rejections",
                                  "Requests refused or dropped before the model ran, by reason.", ["reason"],
                                  registry=r)
        self.model_info = Gauge("paligemma_model_info", "The loaded model (value is always 1).",
                                ["model", "dtype", "device", "random_weights", "masks"], registry=r)
        self.ready = Gauge("paligemma_ready", "1 when the model is loaded and warmed up and not draining.",
                           registry=r)
        self.feature_cache_hits = Counter("paligemma_feature_cache_hits",
                                          "Requests whose image features came from the cache.", registry=r)

    # BatchObserver
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def batch_started(self, size: int, queue_waits: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def batch_finished(self, size: int, seconds: float) -> None:
        self.inference.observe(seconds)

    def dropped(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
