"""All configuration, read once from `PALIGEMMA_*` environment variables into one object.

The object is built at start-up (or by a test) and passed down; nothing reads the environment later.
A bad value stops start-up with a message that names the variable (`load_settings`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.adapters.names import parse_adapter_list
from app.image_sources.hosts import normalise_host_entries
from app.sizes import parse_bytes

ENV_PREFIX = "PALIGEMMA_"
# A browser origin: scheme, host, optional port; nothing after.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Model.
    model: str = Field(
        "demo",
        description="demo (the built-in model trained on generated shapes scenes), a preset with random "
                    "weights (tiny, bench, paligemma-3b-224), a hub id or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = Field(0, ge=0, description="Seed of the random weights of the built-in presets.")
    mask_decoder: Path | None = Field(
        None, description="Path of vae-oid.npz; masks are off without it (the demo model brings its own).")
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="Weights of the language model's linear layers: none (the dtype), int8 (torchao "
                            "weight-only) or nf4 (bitsandbytes 4-bit, computing in bfloat16); the "
                            "`quantization` extra. A checkpoint saved quantized loads as saved.",
    )
    quantize_vision: bool = Field(
        False,
        description="Quantize the vision tower and the projector too (they stay in the dtype by default).",
    )
    memory: Annotated[int | None, NoDecode] = Field(
        None,
        description="Device memory the start-up memory plan may use (e.g. 24GiB, 80GB); unset: what the "
                    "device has free (the CPU: MemAvailable). Start-up stops when the model does not fit.",
    )

    # Engine.
    max_batch_size: int = Field(
        32, ge=1, le=1024,
        description="Rows of the KV cache: the most requests generating together, one token each per step.",
    )
    max_queue: int = Field(256, ge=1, le=100_000)
    request_timeout_s: float = Field(60.0, gt=0, le=3600)
    prefill_tokens: int = Field(
        8192, ge=1, le=1_000_000,
        description="Most prompt tokens prefilled in one step (newcomers beyond it join at the next step).",
    )
    cuda_graphs: bool = Field(True, description="On CUDA, capture decode steps as CUDA graphs at start-up.")
    liveness_stall_s: float = Field(
        120.0, gt=0, le=86_400,
        description="/healthz fails when one model step has been running longer than this.",
    )
    prepare_workers: int = Field(2, ge=1, le=64, description="Threads that decode and resize images.")
    feature_cache_size: int = Field(
        64, ge=0, le=100_000, description="Image features kept for repeated images (0 turns it off)."
    )

    # LoRA adapters (docs/fine-tunes.md).
    adapters: Annotated[tuple[tuple[str, Path], ...], NoDecode] = Field(
        (), description="PEFT LoRA adapter folders loaded at start-up beside the base: name=path,name2=path2",
    )
    adapter_root: Path | None = Field(
        None, description="Directory under which POST /v1/adapters may load folders at run time; unset: off.",
    )
    max_adapters: int = Field(8, ge=1, le=256, description="Adapter slots (loaded adapters at most).")
    max_lora_rank: int = Field(16, ge=1, le=1024, description="Highest adapter rank the slots hold.")
    lora_dtype: Literal["auto", "float32"] = Field(
        "auto", description="Adapter weights and deltas: auto (the model's dtype; fewest kernels on a "
                            "GPU) or float32 (PEFT's default: float32 deltas rounded once into the output).",
    )

    # Generation.
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Cap on a request's max_new_tokens.")
    default_max_new_tokens: int = Field(64, ge=1, le=8192)
    max_prompt_tokens: int = Field(
        256, ge=8, le=32_768,
        description="Most text tokens in a prompt (after the image tokens); sizes the KV cache rows.",
    )

    # Input bounds.
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(
        0, ge=0,
        description="Cap on a whole request body; 0 means room for max_image_bytes as base64 plus 1 MiB.",
    )
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_objects: int = Field(16, ge=1, le=256, description="Most objects in one detect/segment request.")
    max_text_chars: int = Field(
        1000, ge=1, le=100_000, description="Longest question, prompt or object name."
    )
    image_url_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Hosts whose http(s) image URLs are fetched (comma-separated): images.example.com, "
        ".example.com for its subdomains, an IP address; :port for a port other than the default. Empty: "
        "image URLs are refused. Private and loopback addresses only for hosts listed exactly.",
    )
    image_url_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Time limit on fetching one image URL, redirects included."
    )
    max_url_fetches: int = Field(
        16, ge=1, le=10_000,
        description="Most image URLs fetched at once; beyond it, 429. A bound of its own: a request holds a "
                    "place in the model queue (max_queue) only once its image is fetched.",
    )

    # Access and operation.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    metrics_require_key: bool = False
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated origins (https://app.example.com) whose pages may call the API from "
                        "a browser, or * for any; empty (the default) sends no CORS headers.",
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry traces: off, otlp (OTLP over HTTP, configured by the standard "
                           "OTEL_EXPORTER_OTLP_* variables; the `otlp` extra) or console (stdout; the `otel` "
                           "extra). OTEL_SERVICE_NAME and OTEL_TRACES_SAMPLER apply too.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(key.strip() for key in value.split(",") if key.strip())
            if value.strip() and not keys:
                # Set, but to separators only: taken as no keys, it would quietly turn authentication off.
                raise ValueError(f"{value!r} holds no key, which would turn authentication off; give "
                                 "comma-separated keys (key-one,key-two), or set it empty for no "
                                 "authentication")
            return keys
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _parse_adapters(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_adapter_list(value)
        return value

    @field_validator("adapter_root")
    @classmethod
    def _check_adapter_root(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no directory at {value}; set it to the directory that holds adapter folders, "
                             "or unset it to turn run-time loading off")
        return value

    @field_validator("image_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return normalise_host_entries(str(entry) for entry in value)
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port] with no path (e.g. "
                                 "https://app.example.com), or * for any")
        return value

    @field_validator("tracing")
    @classmethod
    def _check_tracing_packages(cls, value: str) -> str:
        needed = {"console": ("opentelemetry.sdk", "otel"),
                  "otlp": ("opentelemetry.exporter.otlp.proto.http", "otlp")}.get(value)
        if needed and not _importable(needed[0]):
            raise ValueError(f"{value} traces need the `{needed[1]}` extra: pip install "
                             f"'paligemma-server[{needed[1]}]' (or set it to off)")
        return value

    @field_validator("quantization")
    @classmethod
    def _check_quantization_packages(cls, value: str) -> str:
        needed = {"int8": "torchao", "nf4": "bitsandbytes"}.get(value)
        if needed and not _importable(needed):
            raise ValueError(f"{value} needs {needed}, in the `quantization` extra: pip install "
                             "'paligemma-server[quantization]' (or set it to none)")
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            return parse_bytes(value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps. Given: {value!r}")

    @field_validator("mask_decoder")
    @classmethod
    def _check_decoder_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no file at {value}; set it to the path of vae-oid.npz or unset it")
        return value

    @model_validator(mode="after")
    def _check_adapter_count(self) -> Settings:
        if len(self.adapters) > self.max_adapters:
            raise ValueError(
                f"{ENV_PREFIX}ADAPTERS lists {len(self.adapters)} adapters but {ENV_PREFIX}MAX_ADAPTERS is "
                f"{self.max_adapters}; raise it"
            )
        return self

    @model_validator(mode="after")
    def _check_token_caps(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"{ENV_PREFIX}DEFAULT_MAX_NEW_TOKENS ({self.default_max_new_tokens}) must be <= "
                f"{ENV_PREFIX}MAX_NEW_TOKENS ({self.max_new_tokens})"
            )
        return self

    @property
    def adapters_enabled(self) -> bool:
        """Whether adapter slots are set up: adapters at start-up, or run-time loading."""
        return bool(self.adapters) or self.adapter_root is not None

    @property
    def request_body_limit(self) -> int:
        # The image may come as base64 in JSON: 4 characters for every 3 bytes, plus room for the fields.
        return self.max_request_bytes or -(-self.max_image_bytes // 3) * 4 + 1024 * 1024


# Variables earlier versions read; setting one now has no effect, so start-up says so.
REMOVED_VARIABLES = {
    f"{ENV_PREFIX}MAX_BATCH_WAIT_MS": "requests join a running batch at the next model step; nothing waits",
}


def removed_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per removed variable that is set in `environ`."""
    return [f"{name} is no longer used ({why}); unset it" for name, why in REMOVED_VARIABLES.items()
            if name in environ]


class SettingsError(Exception):
    """Start-up configuration is wrong; the message names every offending variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus `overrides`) or fail with a message naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            lines.append(f"{name}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
