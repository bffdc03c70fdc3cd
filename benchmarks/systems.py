"""The systems under test: how to start each one on a loopback port, and how to tell it is ready."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.procs import HOST, python


@dataclass(frozen=True)
class Config:
    model: str = "bench"
    seed: int = 0
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0  # our PALIGEMMA_MAX_BATCH_WAIT_MS default
    request_timeout_s: float = 60.0  # our PALIGEMMA_REQUEST_TIMEOUT_S default


@dataclass(frozen=True)
class System:
    name: str
    title: str
    ready_path: str
    scrape_metrics: bool  # whether /metrics is ours (batch and queue histograms)

    def command(self, port: int, config: Config) -> tuple[list[str], dict[str, str]]:
        if self.name.startswith("ours"):
            extra = {"PALIGEMMA_FEATURE_CACHE_SIZE": "0"} if self.name == "ours_nocache" else {}
            return [python(), "-m", "app"], {
                **extra,
                "PALIGEMMA_MODEL": config.model,
                "PALIGEMMA_SEED": str(config.seed),
                "PALIGEMMA_HOST": HOST,
                "PALIGEMMA_PORT": str(port),
                "PALIGEMMA_MAX_BATCH_SIZE": str(config.max_batch_size),
                "PALIGEMMA_MAX_BATCH_WAIT_MS": str(config.batch_wait_ms),
                "PALIGEMMA_REQUEST_TIMEOUT_S": str(config.request_timeout_s),
            }
        args = [python(), "-m", f"benchmarks.peers.{_PEER_MODULES[self.name]}", "--host", HOST,
                "--port", str(port), "--model", config.model, "--seed", str(config.seed),
                "--max-batch-size", str(config.max_batch_size), "--batch-wait-ms", str(config.batch_wait_ms),
                "--timeout-s", str(config.request_timeout_s)]
        return args, {}


_PEER_MODULES = {"tutorial": "tutorial", "litserve": "litserve_peer", "pipeline": "pipeline"}

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("ours", "ours (python -m app)", "/readyz", True),
        # The same server with its image-feature cache off: serving efficiency without the reuse of work
        # that the cache brings (requests about one image within a batch still share one encoding).
        System("ours_nocache", "ours, feature cache off (PALIGEMMA_FEATURE_CACHE_SIZE=0)", "/readyz", True),
        System("tutorial", "tutorial (FastAPI, generate per request)", "/healthz", False),
        System("litserve", "LitServe (batched LitAPI)", "/health", False),
        System("pipeline", 'transformers pipeline("image-text-to-text")', "/healthz", False),
    )
}
