"""Prometheus metrics, ours prefixed `paligemma_`, in a registry owned by one app instance.

`CONTRACT` is the one list of what the server exports: the collectors are built from it, and the docs'
metrics table, the Grafana dashboard, the alert rules and the autoscaler are checked against it in both
directions (tests/unit/test_metric_contract.py), so none of them can name a metric the server lacks, nor the
server add one they do not show.

A registry per app (not the process-global default) lets tests build several apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the family name; counters are exposed with `_total`, histograms with _bucket/_sum/_count
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def samples(self) -> tuple[str, ...]:
        """The sample names this metric appears under in the exposition format."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.name,)


CONTRACT: tuple[MetricSpec, ...] = (
    MetricSpec("paligemma_requests", "counter", "HTTP requests to /v1/*, by endpoint, status code and LoRA "
               "adapter (empty for the base).", ("endpoint", "status", "adapter")),
    MetricSpec("paligemma_request_duration_seconds", "histogram",
               "Time from a task request's arrival to its response (successful requests).", ("endpoint",),
               _LATENCY_BUCKETS),
    MetricSpec("paligemma_queue_wait_seconds", "histogram",
               "Time from a request reaching the engine to getting a KV-cache row.", (), _LATENCY_BUCKETS),
    MetricSpec("paligemma_time_to_first_token_seconds", "histogram",
               "Time from a request reaching the engine to its first generated token.", (), _LATENCY_BUCKETS),
    MetricSpec("paligemma_step_duration_seconds", "histogram",
               "Time of one model step: `prefill` (newcomers' prompts) or `decode` (one token per row).",
               ("phase",), _STEP_BUCKETS),
    MetricSpec("paligemma_step_rows", "histogram",
               "Rows in one model step: newcomers in a prefill, running requests in a decode.", ("phase",),
               _ROW_BUCKETS),
    MetricSpec("paligemma_queue_depth", "gauge",
               "Requests admitted and not running yet (being prepared, or waiting for a row)."),
    MetricSpec("paligemma_running_requests", "gauge", "Requests holding a KV-cache row (generating)."),
    MetricSpec("paligemma_generated_tokens", "counter",
               "Tokens generated, counted as each step computes them (cancelled requests' tokens too).",
               ("endpoint", "adapter")),
    MetricSpec("paligemma_prompt_tokens", "counter", "Prompt tokens of answered requests (image tokens "
               "included).", ("endpoint", "adapter")),
    MetricSpec("paligemma_rejections", "counter",
               "Requests refused, dropped or cancelled before their answer, by reason: queue_full, "
               "url_fetches_full, shutting_down, timeout, disconnected.", ("reason",)),
    MetricSpec("paligemma_model_info", "gauge", "The loaded model (value is always 1).",
               ("model", "dtype", "device", "random_weights", "masks")),
    MetricSpec("paligemma_ready", "gauge", "1 when the model is loaded and warmed up and not draining."),
    MetricSpec("paligemma_feature_cache_hits", "counter",
               "Prefills whose image features came from the cache."),
    MetricSpec("paligemma_decode_graphs_failed", "gauge",
               "1 when the decode graphs were discarded at warm-up (they disagreed with the eager step, or "
               "capturing them failed) and the server decodes eagerly; 0 otherwise."),
)

# Prefixes of the standard collectors' series above: beside the contract, not in it.
PROCESS_PREFIXES = ("process_", "python_")

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Metrics:
    """The server's collectors, and the engine's `EngineObserver` (app.engine.observer) over them."""

    def __init__(self) -> None:
        # `*_created` timestamps double the output and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.collectors = {spec.name: self._build(spec) for spec in CONTRACT}
        # The standard process and runtime series every Prometheus client exports by default (memory,
        # CPU, open files; interpreter version; garbage collections), which our own registry would lack.
        # Not part of CONTRACT: nothing here depends on them (PROCESS_PREFIXES).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        c = self.collectors
        self.requests = c["paligemma_requests"]
        self.request_duration = c["paligemma_request_duration_seconds"]
        self.queue_wait_seconds = c["paligemma_queue_wait_seconds"]
        self.time_to_first_token = c["paligemma_time_to_first_token_seconds"]
        self.step_duration = c["paligemma_step_duration_seconds"]
        self.step_rows = c["paligemma_step_rows"]
        self.queue_depth_gauge = c["paligemma_queue_depth"]
        self.running_requests = c["paligemma_running_requests"]
        self.generated_tokens = c["paligemma_generated_tokens"]
        self.prompt_tokens = c["paligemma_prompt_tokens"]
        self.rejections = c["paligemma_rejections"]
        self.model_info = c["paligemma_model_info"]
        self.ready = c["paligemma_ready"]
        self.feature_cache_hit_count = c["paligemma_feature_cache_hits"]
        self.decode_graphs_failed = c["paligemma_decode_graphs_failed"]

    def _build(self, spec: MetricSpec) -> Any:  # a Counter, Gauge or Histogram: each has its own methods
        extra = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
        return _KINDS[spec.kind](spec.name, spec.help, spec.labels, registry=self.registry, **extra)

    # EngineObserver --------------------------------------------------------------------------------
    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def running(self, rows: int) -> None:
        self.running_requests.set(rows)

    def step(self, phase: str, rows: int, seconds: float) -> None:
        self.step_duration.labels(phase).observe(seconds)
        self.step_rows.labels(phase).observe(rows)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def tokens(self, label: str, adapter: str, count: int) -> None:
        if label:  # requests that came from no endpoint (the warm-up) are not traffic
            self.generated_tokens.labels(label, adapter).inc(count)

    def feature_cache_hits(self, count: int) -> None:
        if count:
            self.feature_cache_hit_count.inc(count)

    def dropped(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    # Adapters ---------------------------------------------------------------------------------------
    def forget_adapter(self, name: str) -> None:
        """Drop the series of an unloaded adapter, so the `adapter` label only ever holds loaded names
        (plus "" for the base) and its cardinality stays bounded by PALIGEMMA_MAX_ADAPTERS."""
        for spec in CONTRACT:
            if "adapter" not in spec.labels:
                continue
            collector = self.collectors[spec.name]
            children = {tuple(sample.labels.get(label, "") for label in spec.labels)
                        for family in collector.collect() for sample in family.samples
                        if sample.labels.get("adapter") == name}
            for values in children:
                collector.remove(*values)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def standard_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The standard collectors' metrics as Prometheus sees them (counters under their `_total` name):
    name -> (type, labels). Read from a live registry, so the deploy checks know exactly what /metrics
    has beside the contract on this platform (the process_* series exist where /proc does)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in Metrics().registry.collect():
        if family.name.startswith(PROCESS_PREFIXES):
            name = f"{family.name}_total" if family.type == "counter" else family.name
            labels = sorted({label for sample in family.samples for label in sample.labels})
            found[name] = (family.type, tuple(labels))
    return found
