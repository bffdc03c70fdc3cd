"""The model side of a step: prefill newcomers into their cache rows, decode one token for running rows.

Runs only in the engine's worker thread. It owns the preallocated KV cache, the step model, the decode
graphs, the image-feature cache and each sampled request's random generator. The scheduler decides;
this computes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from app.adapters.bank import AdapterBank, AdapterRef, DecodeForm
from app.engine.graphs import DecodeGraphs, graph_buckets
from app.engine.kv_cache import CacheShape, SlotKVCache
from app.engine.sampling import GREEDY, SamplingParams, new_generator, select_tokens
from app.engine.scheduler import Sequence
from app.engine.step_model import StepModel
from app.model.features import FeatureCache
from app.model.loader import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowInput:
    """What the model needs of one request, prepared outside the worker."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # (3, H, W) float32 on the CPU, already normalised
    image_key: str | None = None  # identifies the image's content, for the feature cache
    sampling: SamplingParams = GREEDY
    adapter: AdapterRef | None = None  # the LoRA adapter it runs with; None: the base

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter is not None else 0

    @property
    def feature_key(self) -> tuple[int | None, str] | None:
        """The feature cache's key: the image, and the adapter when it changes the vision tower."""
        if self.image_key is None:
            return None
        vision = self.adapter.uid if self.adapter is not None and self.adapter.vision else None
        return vision, self.image_key


def _vision_slot(item: RowInput) -> int:
    """The adapter slot an item's image is encoded with: the base's unless its adapter changes vision."""
    return item.slot if item.adapter is not None and item.adapter.vision else 0


@dataclass(frozen=True)
class RunnerConfig:
    rows: int
    max_prompt_tokens: int  # text tokens after the image tokens: <bos>, the prefix and its newline
    max_new_tokens: int
    feature_cache_size: int = 0
    cuda_graphs: bool = True
    adapters: AdapterBank | None = None  # LoRA slots over the model's linear layers (app.adapters)
    # How decode steps that run eagerly add adapter deltas (captured graphs always use the dense form);
    # tests force each form to check both on the CPU.
    adapter_decode: DecodeForm = "auto"


def cache_shape(loaded: LoadedModel, config: RunnerConfig) -> CacheShape:
    text: Any = loaded.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return CacheShape(
        layers=text.num_hidden_layers,
        rows=config.rows,
        kv_heads=text.num_key_value_heads,
        length=loaded.image_seq_length + config.max_prompt_tokens + config.max_new_tokens,
        head_dim=head_dim,
    )


# Share of the GPU memory left after loading the model that the KV cache may take: the rest is for
# activations (a prefill of PALIGEMMA_PREFILL_TOKENS), the decode graphs and the mask decoder.
CACHE_MEMORY_SHARE = 0.5


def rows_that_fit(shape: CacheShape, dtype: torch.dtype, free_bytes: int) -> int:
    """The most cache rows (at most `shape.rows`) that fit in CACHE_MEMORY_SHARE of `free_bytes`."""
    per_row = CacheShape(shape.layers, 1, shape.kv_heads, shape.length, shape.head_dim).bytes(dtype)
    return max(1, min(shape.rows, int(free_bytes * CACHE_MEMORY_SHARE) // per_row))


class ModelStepRunner:
    def __init__(self, loaded: LoadedModel, config: RunnerConfig):
        self.loaded = loaded
        self.config = config
        self.device = loaded.device
        self.shape = cache_shape(loaded, config)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            rows = rows_that_fit(self.shape, loaded.dtype, free)
            if rows < self.shape.rows:
                logger.warning("a KV cache of %d rows would take %.1f GiB of the %.1f GiB free: using %d "
                               "rows (lower PALIGEMMA_MAX_NEW_TOKENS or PALIGEMMA_MAX_PROMPT_TOKENS for "
                               "more)",
                               self.shape.rows, self.shape.bytes(loaded.dtype) / 2**30, free / 2**30, rows)
                self.shape = dataclasses.replace(self.shape, rows=rows)
        logger.info("KV cache: %d rows of %d positions, %.2f GiB", self.shape.rows, self.shape.length,
                    self.shape.bytes(loaded.dtype) / 2**30)
        self.cache = SlotKVCache(self.shape, loaded.dtype, loaded.device)
        self.step = StepModel(loaded.model, self.cache)
        self.adapters = config.adapters
        self.graphs = DecodeGraphs(self.step, loaded.pad_token_id, self.adapters, config.adapter_decode)
        self.features = FeatureCache(config.feature_cache_size)
        self._generators: dict[int, torch.Generator | None] = {}
        self.feature_cache_hits = 0  # read by the engine for its metrics

    @property
    def rows(self) -> int:
        return self.shape.rows

    @property
    def cache_bytes(self) -> int:
        return self.shape.bytes(self.loaded.dtype)

    # Warm-up ---------------------------------------------------------------------------------------
    def capture_graphs(self) -> None:
        """On CUDA (unless turned off), capture the decode step for every bucket, logging progress."""
        if self.device.type != "cuda" or not self.config.cuda_graphs:
            return
        buckets = graph_buckets(self.rows)

        def progress(done: int, total: int, seconds: float) -> None:
            logger.info("capturing decode graphs: %d/%d batch sizes, %.0f s", done, total, seconds)

        try:
            with torch.inference_mode():
                self.graphs.capture(buckets, progress)
        except Exception:
            # Serving eagerly is slower but correct; the log says so loudly.
            logger.exception("capturing decode graphs failed; decoding eagerly instead")
            self.graphs.discard()

    # Steps -----------------------------------------------------------------------------------------
    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with work already queued on the GPU.
            return tensor.pin_memory().to(self.device, dtype, non_blocking=True)
        return tensor.to(self.device, dtype)

    def _route(self, slots: list[int]) -> None:
        """Each batch item's adapter slot, for the next eager forward."""
        if self.adapters is not None:
            self.adapters.route(slots)

    def _image_features(self, inputs: list[RowInput]) -> torch.Tensor:
        """(batch, image tokens, hidden); each distinct image (per vision adapter) not in the cache is
        encoded once."""
        keys: list[Hashable] = [item.feature_key or index for index, item in enumerate(inputs)]
        found: dict[Hashable, torch.Tensor] = {}
        to_encode: dict[Hashable, RowInput] = {}
        for key, item in zip(keys, inputs, strict=True):
            if key in found or key in to_encode:
                continue
            cached = self.features.get(item.feature_key)
            if cached is not None:
                found[key] = cached
                self.feature_cache_hits += 1
            else:
                to_encode[key] = item
        if to_encode:
            # Ordered by vision adapter: each adapter's images are one slice of the batch.
            batch = sorted(to_encode.items(), key=lambda entry: _vision_slot(entry[1]))
            pixels = self._to_device(torch.stack([item.pixel_values for _, item in batch]), self.loaded.dtype)
            self._route([_vision_slot(item) for _, item in batch])
            encoded = self.loaded.model.get_image_features(pixels).pooler_output
            for (key, item), features in zip(batch, encoded, strict=True):
                found[key] = features
                self.features.put(item.feature_key, features)
        return torch.stack([found[key] for key in keys])

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Write each newcomer's prompt into its row; each one's first generated token."""
        if self.adapters is not None:
            # Ordered by adapter, each adapter's rows are one slice of the batch (app.adapters.lora_linear).
            order = sorted(range(len(seqs)), key=lambda i: seqs[i].payload.slot)
            tokens = self._prefill([seqs[i] for i in order])
            by_seq = dict(zip(order, tokens, strict=True))
            return [by_seq[i] for i in range(len(seqs))]
        return self._prefill(seqs)

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        inputs: list[RowInput] = [seq.payload for seq in seqs]
        longest = max(len(item.input_ids) for item in inputs)
        if longest > self.shape.length:
            raise ValueError(f"a prompt of {longest} tokens does not fit a cache row of "
                             f"{self.shape.length}")
        input_ids = torch.full((len(inputs), longest), self.loaded.pad_token_id, dtype=torch.long)
        for i, item in enumerate(inputs):
            input_ids[i, : len(item.input_ids)] = torch.tensor(item.input_ids, dtype=torch.long)
        lengths = torch.tensor([len(item.input_ids) for item in inputs], dtype=torch.long)
        rows = torch.tensor([seq.row for seq in seqs], dtype=torch.long)
        features = self._image_features(inputs)
        self._route([item.slot for item in inputs])
        logits = self.step.prefill(self._to_device(rows), self._to_device(input_ids),
                                   self._to_device(lengths), features)
        for seq, item in zip(seqs, inputs, strict=True):
            self._generators[seq.request_id] = new_generator(item.sampling, self.device)
        return self._select(seqs, logits)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], width: int) -> list[int]:
        """One token for each running row; the step covers rows 0..width-1 (idle ones at scratch)."""
        tokens = [self.loaded.pad_token_id] * width
        positions = [self.shape.scratch] * width
        slots = [0] * width
        for seq in seqs:
            assert seq.row is not None
            tokens[seq.row] = seq.computed[-1]
            positions[seq.row] = seq.next_position
            slots[seq.row] = seq.payload.slot
        logits = self.graphs.run(tokens, positions, slots)
        return self._select(seqs, logits[[seq.row for seq in seqs]])

    @torch.inference_mode()
    def decode_alone(self, seq: Sequence) -> int:
        """The same step for one row by itself, eagerly: used to find which row makes a step fail."""
        assert seq.row is not None
        self._route([seq.payload.slot])
        logits = self.step.decode(
            torch.tensor([seq.computed[-1]], device=self.device),
            torch.tensor([seq.next_position], device=self.device),
            rows=torch.tensor([seq.row], device=self.device),
            length=seq.next_position + 1,
        )
        return self._select([seq], logits)[0]

    def recover_memory(self) -> None:
        """After an out-of-memory error: hand cached blocks back so a smaller step can fit."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, seq: Sequence) -> None:
        """Forget a finished or dropped request's per-row state."""
        self._generators.pop(seq.request_id, None)

    def _select(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        params = [seq.payload.sampling for seq in seqs]
        generators = [self._generators.get(seq.request_id) for seq in seqs]
        return select_tokens(logits, params, generators)
