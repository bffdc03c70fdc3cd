"""The model side of a step: prefill newcomers into their cache rows, decode one token for running rows.

Runs only in the engine's worker thread. It owns the preallocated KV cache, the row table (what each row
feeds the next decode step, with which LoRA adapter, and how its tokens are chosen), the step model, the
decode graphs, the sampler and the image-feature cache. The scheduler decides; this computes.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from app.adapters.bank import AdapterBank, AdapterRef, DecodeForm
from app.engine.graphs import Capture, DecodeGraphs, graph_buckets
from app.engine.kv_cache import DecodeRows, SlotKVCache, cache_shape, fit_to_memory
from app.engine.rows import Column, RowTable
from app.engine.sampler import SAMPLING_COLUMNS, Sampler
from app.engine.scheduler import Sequence
from app.engine.step_model import StepModel
from app.model.features import FeatureCache
from app.model.loader import LoadedModel
from app.model.quantization import graphs_allowed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowInput:
    """What the model needs of one request, prepared outside the worker."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # (3, H, W) float32 on the CPU, already normalised
    image_key: str | None = None  # identifies the image's content, for the feature cache
    adapter: AdapterRef | None = None  # the LoRA adapter it runs with; None: the base

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter is not None else 0

    @property
    def vision_slot(self) -> int:
        """The adapter slot its image is encoded with: the base's unless its adapter changes vision."""
        return self.slot if self.adapter is not None and self.adapter.vision else 0

    @property
    def feature_key(self) -> tuple[int | None, str] | None:
        """The feature cache's key: the image, and the adapter when it changes the vision tower."""
        if self.image_key is None:
            return None
        vision = self.adapter.uid if self.adapter is not None and self.adapter.vision else None
        return vision, self.image_key


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
    # How prefills and the vision tower add them. auto: dense on CUDA, where an eager forward is bound by
    # its launches and the grouped form launches a few kernels per adapter present in every layer (on an
    # H200 a prefill of 8 over 4 adapters took 3.1x the base's grouped); grouped elsewhere, where the
    # dense form's matmuls over every slot cost real time.
    adapter_prefill: DecodeForm = "auto"


def decode_columns(pad_token_id: int, scratch: int) -> list[Column]:
    """What each row feeds the next decode step. A row nobody runs feeds <pad> at the cache's scratch
    index, where its write lands out of every real row's sight (app/engine/kv_cache.py), with adapter slot
    0, the base's (zeros)."""
    return [Column("token", torch.long, pad_token_id), Column("position", torch.long, scratch),
            Column("adapter", torch.long, 0)]


def row_length(image_tokens: int, config: RunnerConfig) -> int:
    """Positions of one cache row: the image tokens, the longest prompt and the most new tokens."""
    return image_tokens + config.max_prompt_tokens + config.max_new_tokens


class ModelStepRunner:
    """`graph_capture` replaces the CUDA-graph capture of the decode step (see `app.engine.graphs`)."""

    def __init__(self, loaded: LoadedModel, config: RunnerConfig, graph_capture: Capture | None = None):
        self.loaded = loaded
        self.config = config
        self.device = loaded.device
        length = row_length(loaded.image_seq_length, config)
        self.shape = fit_to_memory(cache_shape(loaded.model.config.text_config, config.rows, length),
                                   loaded.dtype, self.device)
        logger.info("KV cache: %d rows of %d positions, %.2f GiB", self.shape.rows, self.shape.length,
                    self.shape.bytes(loaded.dtype) / 2**30)
        self.cache = SlotKVCache(self.shape, loaded.dtype, loaded.device)
        self.step = StepModel(loaded.model, self.cache)
        self.table = RowTable(self.shape.rows,
                              [*decode_columns(loaded.pad_token_id, self.shape.scratch), *SAMPLING_COLUMNS],
                              self.device)
        self.sampler = Sampler(self.table)
        self._row_of: dict[int, int] = {}  # request id -> its row, while its row holds its state
        self._graph_capture = graph_capture
        self.adapters = config.adapters
        self._prefill_form: DecodeForm = config.adapter_prefill
        if self._prefill_form == "auto":
            self._prefill_form = "dense" if self.device.type == "cuda" else "grouped"
        self.graphs = DecodeGraphs(self.step, self.table, graph_capture, self.adapters, config.adapter_decode)
        self.features = FeatureCache(config.feature_cache_size)
        self.feature_cache_hits = 0  # read by the engine for its metrics

    @property
    def rows(self) -> int:
        return self.shape.rows

    @property
    def cache_bytes(self) -> int:
        return self.shape.bytes(self.loaded.dtype)

    # Warm-up ---------------------------------------------------------------------------------------
    def capture_graphs(self) -> None:
        """On CUDA (unless turned off), capture the decode step for every bucket, logging progress, then
        check each graph against the eager step; on any disagreement, decode eagerly (app.engine.graphs)."""
        if not self.config.cuda_graphs or (self.device.type != "cuda" and self._graph_capture is None):
            return
        unfit = graphs_allowed(self.loaded.model)
        if unfit is not None:
            logger.warning("CUDA graphs off: %s; decoding eagerly", unfit)
            return
        buckets = graph_buckets(self.rows)

        def progress(done: int, total: int, seconds: float) -> None:
            logger.info("capturing decode graphs: %d/%d batch sizes, %.0f s", done, total, seconds)

        try:
            with torch.inference_mode():
                self.graphs.capture(buckets, progress)
                problems = self.graphs.verify()
        except Exception as exc:
            # Serving eagerly is slower but correct; the log says so loudly.
            logger.exception("capturing decode graphs failed; decoding eagerly instead")
            self.graphs.discard(f"capturing them failed: {exc!r}")
            return
        if problems:
            reason = "they disagree with the eager step: " + "; ".join(problems)
            logger.error("decode graphs discarded, %s; decoding eagerly instead", reason)
            self.graphs.discard(reason)
        else:
            logger.info("decode graphs agree with the eager step for all %d batch sizes", len(buckets))

    # Steps -----------------------------------------------------------------------------------------
    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with work already queued on the GPU.
            return tensor.pin_memory().to(self.device, dtype, non_blocking=True)
        return tensor.to(self.device, dtype)

    def _route(self, slots: list[int]) -> None:
        """Each batch item's adapter slot, for the next eager forward other than a decode step's (a
        prefill, the vision tower, one row decoded alone)."""
        if self.adapters is not None:
            self.adapters.route(slots, self._prefill_form)

    def _image_features(self, inputs: list[RowInput]) -> torch.Tensor:
        """(batch, image tokens, hidden); each distinct image (under its vision adapter) not in the cache
        is encoded once."""
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
            batch = sorted(to_encode.items(), key=lambda entry: entry[1].vision_slot)
            pixels = self._to_device(torch.stack([item.pixel_values for _, item in batch]), self.loaded.dtype)
            self._route([item.vision_slot for _, item in batch])
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
        rows = _rows(seqs)
        for seq, row in zip(seqs, rows, strict=True):
            self._row_of[seq.request_id] = row
            self.sampler.admit(row, seq.sampling)
            self.table.write(row, adapter=seq.payload.slot)  # its decode steps' adapter, until released
        try:
            features = self._image_features(inputs)
            self._route([item.slot for item in inputs])
            logits = self.step.prefill(self._to_device(torch.tensor(rows)), self._to_device(input_ids),
                                       self._to_device(lengths), features)
            tokens = self.sampler.select(logits, rows, range(len(seqs)))
        except BaseException:
            for seq in seqs:  # their rows are idle again, whatever happens to them next
                self.release(seq)
            raise
        for seq, row, token in zip(seqs, rows, tokens, strict=True):
            self.table.write(row, token=token, position=seq.prompt_length)
        return tokens

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], width: int) -> list[int]:
        """One token for each running row; the step covers rows 0..width-1, as the row table holds them
        (rows nobody runs are idle there)."""
        logits = self.graphs.run(width, max(seq.next_position for seq in seqs) + 1)
        rows = _rows(seqs)
        tokens = self.sampler.select(logits, range(width), rows)
        self._advance(rows, tokens)
        return tokens

    @torch.inference_mode()
    def decode_alone(self, seq: Sequence) -> int:
        """The same step for one row by itself, eagerly: used to find which row makes a step fail."""
        assert seq.row is not None
        self._route([int(self.table.host("adapter")[seq.row])])
        target = DecodeRows(torch.tensor([seq.row], device=self.device),
                            torch.tensor([seq.next_position], device=self.device), seq.next_position + 1)
        logits = self.step.decode(torch.tensor([seq.computed[-1]], device=self.device), target)
        token = self.sampler.select(logits, [seq.row], [0])[0]
        self._advance([seq.row], [token])
        return token

    def _advance(self, rows: list[int], tokens: list[int]) -> None:
        """Each row feeds its new token next, one position further."""
        self.table.host("token")[rows] = tokens
        self.table.host("position")[rows] += 1

    def recover_memory(self) -> None:
        """After an out-of-memory error: hand cached blocks back so a smaller step can fit."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, seq: Sequence) -> None:
        """Forget a finished or dropped request's per-row state: its row is idle again."""
        row = self._row_of.pop(seq.request_id, None)
        if row is not None:
            self.sampler.release(row)
            self.table.release([row])


def _rows(seqs: list[Sequence]) -> list[int]:
    rows = [seq.row for seq in seqs if seq.row is not None]
    if len(rows) != len(seqs):
        raise RuntimeError("a request without a row in a decode step")
    return rows
