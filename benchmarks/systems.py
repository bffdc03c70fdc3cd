"""The systems under test: how to start each one on a loopback port, and how to tell it is ready."""

from __future__ import annotations

from dataclasses import dataclass

from app.settings import Settings
from benchmarks.procs import HOST, python

# Our server's defaults, read from its settings class (not from the environment).
SERVER_ROWS = Settings.model_fields["max_batch_size"].default  # KV-cache rows, PALIGEMMA_MAX_BATCH_SIZE
SERVER_TIMEOUT_S = Settings.model_fields["request_timeout_s"].default


@dataclass(frozen=True)
class Config:
    model: str = "bench"
    seed: int = 0
    # Ours: KV-cache rows, the most requests generating together. Requests join at the next model step;
    # there is no batch wait to set.
    rows: int = SERVER_ROWS
    request_timeout_s: float = SERVER_TIMEOUT_S  # ours, and LitServe's queue timeout
    # LitServe's own static batching (max_batch_size, batch_timeout): what the earlier runs used.
    litserve_max_batch_size: int = 16
    litserve_batch_timeout_ms: float = 5.0


@dataclass(frozen=True)
class System:
    name: str
    title: str
    ready_path: str
    scrape_metrics: bool  # whether /metrics is ours (step, queue and token metrics)

    def command(self, port: int, config: Config) -> tuple[list[str], dict[str, str]]:
        if self.name.startswith("ours"):
            extra = {"PALIGEMMA_FEATURE_CACHE_SIZE": "0"} if self.name == "ours_nocache" else {}
            # Rows are always passed, the default too, so a PALIGEMMA_MAX_BATCH_SIZE in the caller's
            # environment cannot make the server differ from the ceiling it is compared with.
            return [python(), "-m", "app"], {
                **extra,
                "PALIGEMMA_MODEL": config.model,
                "PALIGEMMA_SEED": str(config.seed),
                "PALIGEMMA_HOST": HOST,
                "PALIGEMMA_PORT": str(port),
                "PALIGEMMA_MAX_BATCH_SIZE": str(config.rows),
                "PALIGEMMA_REQUEST_TIMEOUT_S": str(config.request_timeout_s),
            }
        # The tutorial server and the pipeline take the batch arguments and ignore them.
        args = [python(), "-m", f"benchmarks.peers.{_PEER_MODULES[self.name]}", "--host", HOST,
                "--port", str(port), "--model", config.model, "--seed", str(config.seed),
                "--max-batch-size", str(config.litserve_max_batch_size),
                "--batch-wait-ms", str(config.litserve_batch_timeout_ms),
                "--timeout-s", str(config.request_timeout_s)]
        return args, {}


_PEER_MODULES = {"tutorial": "tutorial", "litserve": "litserve_peer", "pipeline": "pipeline"}

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("ours", "ours (python -m app)", "/readyz", True),
        # The same server with its image-feature cache off: serving efficiency without the reuse of work
        # that the cache brings (requests about one image prefilled in one step still share an encoding).
        System("ours_nocache", "ours, feature cache off (PALIGEMMA_FEATURE_CACHE_SIZE=0)", "/readyz", True),
        System("tutorial", "tutorial (FastAPI, generate per request)", "/healthz", False),
        System("litserve", "LitServe (batched LitAPI)", "/health", False),
        System("pipeline", 'transformers pipeline("image-text-to-text")', "/healthz", False),
    )
}
