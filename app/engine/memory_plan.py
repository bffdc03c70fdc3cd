"""The memory plan: what a model takes on its device before any weight is loaded, and whether it fits.

The architecture is built on the meta device from its config (no memory, no download of weights) and
every parameter and buffer is counted: at the serving dtype, or at what its quantization stores
(`quantized_linear_bytes`, checked against the bytes of real quantized layers in the tests). The KV
cache is the engine's own arithmetic (`kv_cache.cache_shape`, `runner.row_length`, `rows_that_fit`): it takes
CACHE_MEMORY_SHARE of what the weights and a runtime reserve leave, the rest is for activations.

Activations are an estimate, for one prefill step of PALIGEMMA_PREFILL_TOKENS prompt tokens (capped by
what the rows can hold), `s` the dtype's bytes, P the step's tokens, L a row's prompt (image tokens +
PALIGEMMA_MAX_PROMPT_TOKENS), n = ceil(P / L) prompts in the step, T the image tokens:
  language layer  s * P * (3 hidden + (heads + 2 kv_heads) head_dim + 3 intermediate)   (one layer live)
  attention       4 * n * heads * L^2 + s * n * L^2        (float32 scores of eager attention, the mask)
  vision tower    s * n * T * (3 hidden_v + 3 intermediate_v) + s * n * heads_v * T^2
  logits          4 * rows * vocab                          (float32, one row each, when tokens are chosen)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from app.adapters.bank import wrappable
from app.engine.kv_cache import CACHE_MEMORY_SHARE, CacheShape, cache_shape, rows_that_fit
from app.engine.runner import RunnerConfig, row_length
from app.model.quantization import NF4_BLOCK, NF4_NESTED_BLOCK, Quantization, is_kept, kept_modules
from app.sizes import gib

# Memory the runtime takes besides the model and the cache (the CUDA context, allocator slack); left out
# of what the cache may use. Not counted on the CPU, where the process' own size is not the model's.
RUNTIME_RESERVE = {"cuda": 512 * 2**20, "cpu": 0}
PARTS = ("vision tower", "projector", "embeddings", "language model", "lm_head")


@dataclass(frozen=True)
class PlanRequest:
    """What the plan is for: the serving settings that decide memory."""

    dtype: torch.dtype
    quantization: Quantization
    quantize_vision: bool
    rows: int
    max_prompt_tokens: int
    max_new_tokens: int
    prefill_tokens: int
    memory_bytes: int | None  # the device's memory (or what is free); None: no verdict
    device_type: str = "cuda"
    # LoRA adapter slots (app.adapters.bank), allocated before the KV cache: 0 when no adapters are
    # configured, else PALIGEMMA_MAX_ADAPTERS + 1 (slot 0, the base's, is zeros but allocated too).
    adapter_slots: int = 0
    lora_rank: int = 0
    lora_dtype: torch.dtype | None = None  # None: the dtype


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    request: PlanRequest
    parameters: int
    weight_bytes: int
    weight_bytes_by_part: dict[str, int]
    quantized_layers: int
    image_tokens: int
    cache: CacheShape  # at the rows that fit (all that were asked for when no memory is given)
    kv_bytes_per_token: int
    kv_bytes_per_row: int
    activation_bytes: int
    reserve_bytes: int
    adapter_bytes: int = 0  # the stacked LoRA slots

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes(self.request.dtype)

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.adapter_bytes + self.cache_bytes + self.activation_bytes
                + self.reserve_bytes)

    @property
    def free_after_weights(self) -> int | None:
        """What the weights, the adapter slots and the runtime leave for the cache and activations."""
        if self.request.memory_bytes is None:
            return None
        return self.request.memory_bytes - self.weight_bytes - self.adapter_bytes - self.reserve_bytes

    @property
    def problem(self) -> str | None:
        """Why the model cannot be served in the memory given, or None when it can."""
        free = self.free_after_weights
        if free is None:
            return None
        if free <= 0:
            reserve = f" less the runtime's {gib(self.reserve_bytes)}" if self.reserve_bytes else ""
            weights = gib(self.weight_bytes)
            what = (f"the weights ({weights}) and the adapter slots ({gib(self.adapter_bytes)})"
                    if self.adapter_bytes else f"the weights alone ({weights})")
            return (f"{what} do not fit in "
                    f"{gib(self.request.memory_bytes)}{reserve}")
        if int(free * CACHE_MEMORY_SHARE) < self.kv_bytes_per_row:
            return (f"one KV cache row ({gib(self.kv_bytes_per_row)}) does not fit in the {gib(free)} the "
                    "weights leave (the cache may take half)")
        if free - self.cache_bytes < self.activation_bytes:
            return (f"the activations of one prefill step ({gib(self.activation_bytes)}) do not fit beside "
                    "the weights and the KV cache")
        return None

    @property
    def fits(self) -> bool | None:
        return None if self.request.memory_bytes is None else self.problem is None

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "model": self.model,
            "dtype": str(r.dtype).removeprefix("torch."),
            "quantization": r.quantization.value,
            "quantize_vision": r.quantize_vision,
            "parameters": self.parameters,
            "quantized_layers": self.quantized_layers,
            "weight_bytes": self.weight_bytes,
            "weight_bytes_by_part": self.weight_bytes_by_part,
            "adapter_slots": r.adapter_slots,
            "adapter_bytes": self.adapter_bytes,
            "image_tokens": self.image_tokens,
            "row_length": self.cache.length,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_row": self.kv_bytes_per_row,
            "rows_requested": r.rows,
            "rows_that_fit": self.cache.rows,
            "kv_cache_bytes": self.cache_bytes,
            "prefill_tokens": r.prefill_tokens,
            "activation_bytes": self.activation_bytes,
            "reserve_bytes": self.reserve_bytes,
            "total_bytes": self.total_bytes,
            "memory_bytes": r.memory_bytes,
            "fits": self.fits,
            "problem": self.problem,
        }

    def table(self, measured: dict[str, int] | None = None) -> str:
        """The plan as an aligned text table (with a `measured` column when given, keyed like as_dict)."""
        r = self.request
        method = r.quantization.value + (
            " (vision too)" if r.quantize_vision and r.quantization is not Quantization.NONE else "")
        verdict = {None: "no verdict (no memory given)", True: "yes"}.get(self.fits, f"NO: {self.problem}")
        rows: list[tuple[str, str, str]] = [
            ("model", self.model, ""),
            ("dtype / quantization", f"{str(r.dtype).removeprefix('torch.')} / {method}", ""),
            ("parameters", f"{self.parameters / 1e9:.3f} B", ""),
            ("weights", gib(self.weight_bytes), "weight_bytes"),
            *((f"  {part}", gib(size), "") for part, size in self.weight_bytes_by_part.items()),
            *([(f"adapter slots ({r.adapter_slots - 1} of rank {r.lora_rank})", gib(self.adapter_bytes),
                "adapter_bytes")] if r.adapter_slots else []),
            ("KV per token", f"{self.kv_bytes_per_token / 2**10:.1f} KiB", ""),
            ("KV per row", f"{gib(self.kv_bytes_per_row)} ({self.cache.length} positions)", ""),
            ("rows that fit", f"{self.cache.rows} of {r.rows}", "rows_that_fit"),
            ("KV cache", gib(self.cache_bytes), "kv_cache_bytes"),
            (f"activations (prefill {r.prefill_tokens} tokens)", gib(self.activation_bytes), ""),
            ("runtime reserve", gib(self.reserve_bytes), ""),
            ("total", gib(self.total_bytes), ""),
            ("memory", "unknown" if r.memory_bytes is None else gib(r.memory_bytes), ""),
            ("fits", verdict, ""),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = []
        for name, value, key in rows:
            line = f"{name:<{width}}  {value}"
            if measured is not None and key in measured:
                shown = measured[key] if key == "rows_that_fit" else gib(measured[key])
                line += f"   (measured: {shown})"
            lines.append(line)
        return "\n".join(lines)


def quantized_linear_bytes(method: Quantization, out_features: int, in_features: int,
                           dtype: torch.dtype) -> int:
    """What one linear layer's weight stores under `method` (its bias, unquantized, is counted apart)."""
    n = out_features * in_features
    size = torch.empty((), dtype=dtype).element_size()
    if method is Quantization.NONE:
        return n * size
    if method is Quantization.INT8:  # torchao: int8 weights; per row a float32 scale and an int8 zero point
        return n + out_features * (4 + 1)
    if method is Quantization.BNB_INT8:  # int8 weights and one float32 scale per row (SCB)
        return n + out_features * 4
    # nf4: two weights a byte, a uint8 absmax per block, a float32 absmax per nested block, two code books.
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * (16 + 256)


def _part(name: str) -> str:
    if name.startswith("model.vision_tower"):
        return "vision tower"
    if name.startswith("model.multi_modal_projector"):
        return "projector"
    if name.startswith("lm_head"):
        return "lm_head"
    if "embed_tokens" in name:
        return "embeddings"
    return "language model"


def count_weights(config: PaliGemmaConfig, dtype: torch.dtype, method: Quantization,
                  quantize_vision: bool) -> tuple[int, dict[str, int], int]:
    """(parameters, bytes by part, quantized layers) of the architecture, built on the meta device."""
    parameters, by_part, quantized, _ = _count_weights(config.to_json_string(), dtype, method,
                                                       quantize_vision)
    return parameters, dict(by_part), quantized


def adapter_bytes(config: PaliGemmaConfig, request: PlanRequest) -> int:
    """The stacked LoRA slots (app.adapters.lora_linear): for every layer an adapter may adapt, A (slots x
    rank x in) and B (out x slots x rank), in the adapters' dtype."""
    if not request.adapter_slots:
        return 0
    *_, features = _count_weights(config.to_json_string(), request.dtype, request.quantization,
                                  request.quantize_vision)
    size = torch.empty((), dtype=request.lora_dtype or request.dtype).element_size()
    return request.adapter_slots * request.lora_rank * features * size


@functools.lru_cache(maxsize=64)
def _count_weights(config_json: str, dtype: torch.dtype, method: Quantization,
                   quantize_vision: bool) -> tuple[int, tuple[tuple[str, int], ...], int, int]:
    """count_weights, and the input + output features summed over the layers adapters may adapt."""
    # Built under the serving dtype as loading builds it: buffers made in the default dtype follow it,
    # those made in float32 on purpose (rotary frequencies) keep it.
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(json.loads(config_json)))
    finally:
        torch.set_default_dtype(previous)
    size = torch.empty((), dtype=dtype).element_size()
    kept = kept_modules(quantize_vision)
    by_part = dict.fromkeys(PARTS, 0)
    seen: set[int] = set()
    parameters = quantized = lora_features = 0
    for module_name, module in model.named_modules():
        if wrappable(module_name, module):
            lora_features += module.in_features + module.out_features
        quantize = (method is not Quantization.NONE and type(module) is nn.Linear
                    and not is_kept(module_name, kept))
        quantized += quantize
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if id(tensor) in seen:  # tied: lm_head is the embeddings
                continue
            seen.add(id(tensor))
            if isinstance(tensor, nn.Parameter):
                parameters += tensor.numel()
            if quantize and name == "weight":
                stored = quantized_linear_bytes(method, module.out_features, module.in_features, dtype)
            elif isinstance(tensor, nn.Parameter):
                stored = tensor.numel() * size
            else:  # buffers keep the dtype they are made in (rotary frequencies in float32, position ids)
                stored = tensor.numel() * tensor.element_size()
            by_part[_part(f"{module_name}.{name}")] += stored
    return parameters, tuple((part, size) for part, size in by_part.items() if size), quantized, lora_features


def activation_bytes(config: PaliGemmaConfig, request: PlanRequest, image_tokens: int) -> int:
    """The estimate in the module docstring."""
    text: Any = config.text_config
    vision: Any = config.vision_config
    s = torch.empty((), dtype=request.dtype).element_size()
    row_prompt = image_tokens + request.max_prompt_tokens
    tokens = min(request.prefill_tokens, request.rows * row_prompt)
    prompts = math.ceil(tokens / row_prompt)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layer = s * tokens * (3 * text.hidden_size + (text.num_attention_heads + 2 * text.num_key_value_heads)
                          * head_dim + 3 * text.intermediate_size)
    attention = 4 * prompts * text.num_attention_heads * row_prompt**2 + s * prompts * row_prompt**2
    tower = s * prompts * image_tokens * (3 * vision.hidden_size + 3 * vision.intermediate_size) \
        + s * prompts * vision.num_attention_heads * image_tokens**2
    logits = 4 * request.rows * text.vocab_size
    return int(layer + attention + tower + logits)


def plan(model: str, config: PaliGemmaConfig, request: PlanRequest) -> MemoryPlan:
    vision: Any = config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    parameters, by_part, quantized = count_weights(config, request.dtype, request.quantization,
                                                   request.quantize_vision)
    weights = sum(by_part.values())
    runner = RunnerConfig(rows=request.rows, max_prompt_tokens=request.max_prompt_tokens,
                          max_new_tokens=request.max_new_tokens)
    shape = cache_shape(config.text_config, request.rows, row_length(image_tokens, runner))
    per_row = dataclasses.replace(shape, rows=1).bytes(request.dtype)
    reserve = RUNTIME_RESERVE.get(request.device_type, 0)
    slots = adapter_bytes(config, request)
    if request.memory_bytes is not None:
        free = max(0, request.memory_bytes - weights - slots - reserve)
        shape = dataclasses.replace(shape, rows=rows_that_fit(shape, request.dtype, free))
    text: Any = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return MemoryPlan(
        model=model, request=request, parameters=parameters, weight_bytes=weights,
        weight_bytes_by_part=by_part, quantized_layers=quantized, image_tokens=image_tokens, cache=shape,
        kv_bytes_per_token=2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
        * torch.empty((), dtype=request.dtype).element_size(),
        kv_bytes_per_row=per_row, activation_bytes=activation_bytes(config, request, image_tokens),
        reserve_bytes=reserve, adapter_bytes=slots)
