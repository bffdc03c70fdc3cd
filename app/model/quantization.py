"""Quantized weights: which linear layers, by which library, and how many bytes they take.

`PALIGEMMA_QUANTIZATION`:
- `int8`: torchao's int8 weight-only (one int8 per weight, one scale per output row). Chosen over
  bitsandbytes' LLM.int8 for the engine: a 1.21x faster decode step on `bench` on the CPU, 2.9-4x
  faster bfloat16 layers (benchmarks/RESULTS.md); no host synchronisation (LLM.int8 finds outlier
  columns on the host every call), so its decode step can be captured as a CUDA graph; and the layer
  stays an `nn.Linear` (its weight a tensor subclass) that an adapter can wrap.
- `nf4`: bitsandbytes' 4-bit NormalFloat with double quantization (the QLoRA recipe), computing in
  bfloat16 (the library's default, float32, is slower and buys nothing).
Checkpoints saved already quantized (bitsandbytes 4- or 8-bit, torchao) load as they are; bitsandbytes'
8-bit layers cannot be captured in a CUDA graph, so such a model decodes eagerly (`graphs_allowed`).

Only the language model's decoder layers are quantized. The vision tower, the projector and `lm_head`
(tied to the embeddings) stay in the serving dtype unless PALIGEMMA_QUANTIZE_VISION=true quantizes the
vision tower and the projector too: detection and segmentation read fine spatial detail from the
vision features, which is where quantization is known to cost other VLMs quality. Embeddings are never
quantized: they are a lookup, not a matmul, and `lm_head` shares them.

The same module selection (`kept_modules`) serves both ways of loading: `from_pretrained` with a
quantization config (a checkpoint is quantized tensor by tensor as it loads, so its unquantized weights
never need to fit on the device) and `quantize_in_place` (the built-in presets, made in memory).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Quantization(str, Enum):
    NONE = "none"
    INT8 = "int8"  # torchao int8 weight-only
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat, double quantization
    BNB_INT8 = "bnb-int8"  # bitsandbytes LLM.int8: pre-quantized checkpoints and the benchmark only


SETTING_VALUES = (Quantization.NONE.value, Quantization.INT8.value, Quantization.NF4.value)
NF4_BLOCK = 64  # bitsandbytes' default block: one absmax per 64 weights
NF4_NESTED_BLOCK = 256  # double quantization: one float32 absmax per 256 (uint8) absmax
COMPUTE_DTYPE_4BIT = torch.bfloat16
_VISION_MODULES = ("model.vision_tower", "model.multi_modal_projector")


class QuantizationUnavailable(ImportError):
    """The library a quantization needs is not installed."""


def kept_modules(quantize_vision: bool) -> list[str]:
    """Module-name prefixes that stay in the serving dtype."""
    return ["lm_head"] if quantize_vision else ["lm_head", *_VISION_MODULES]


def is_kept(name: str, kept: list[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in kept)


def target_linears(model: nn.Module, quantize_vision: bool) -> Iterator[tuple[str, nn.Linear]]:
    """The plain linear layers that a quantization replaces (on any device, the meta device included)."""
    kept = kept_modules(quantize_vision)
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not is_kept(name, kept):
            yield name, module


# Libraries ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """bitsandbytes 0.50, on CPUs with AVX512-BF16, asks the Hugging Face hub at import time for a kernel
    to download and run. A server must not fetch and run code at start-up (nor tests touch the network):
    with the hub library offline for the import, bitsandbytes uses its own compiled kernel instead."""
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    quiet = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def import_bitsandbytes() -> Any:
    try:
        with _hub_offline():
            import bitsandbytes
    except ImportError as exc:
        raise QuantizationUnavailable(
            "PALIGEMMA_QUANTIZATION=nf4 needs bitsandbytes: install the `quantization` extra "
            "(pip install 'paligemma-server[quantization]'; `make install` and the image have it)") from exc
    return bitsandbytes


def import_torchao_int8() -> Any:
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as exc:
        raise QuantizationUnavailable(
            "PALIGEMMA_QUANTIZATION=int8 needs torchao: install the `quantization` extra "
            "(pip install 'paligemma-server[quantization]'; `make install` and the image have it)") from exc
    return Int8WeightOnlyConfig


# Loading --------------------------------------------------------------------------------------------
def loading_config(method: Quantization, quantize_vision: bool) -> Any:
    """The `quantization_config` for `from_pretrained`, or None for unquantized weights."""
    kept = kept_modules(quantize_vision)
    if method is Quantization.NONE:
        return None
    if method is Quantization.INT8:
        from transformers import TorchAoConfig

        return TorchAoConfig(import_torchao_int8()(), modules_to_not_convert=kept)
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if method is Quantization.NF4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=COMPUTE_DTYPE_4BIT,
                                  llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_in_place(model: nn.Module, method: Quantization, quantize_vision: bool) -> int:
    """Quantize a built model's target linears where they lie; the number of layers quantized."""
    targets = list(target_linears(model, quantize_vision))
    if method is Quantization.NONE or not targets:
        return 0
    if method is Quantization.INT8:
        from torchao.quantization import quantize_

        names = {name for name, _ in targets}
        quantize_(model, import_torchao_int8()(), filter_fn=lambda module, fqn: fqn in names)
        return len(targets)
    bnb = import_bitsandbytes()
    for name, linear in targets:
        device, weight = linear.weight.device, linear.weight.data
        new: nn.Module
        if method is Quantization.NF4:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                    compute_dtype=COMPUTE_DTYPE_4BIT, compress_statistics=True,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4").to(device)
        else:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False,
                                           has_fp16_weights=False).to(device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        _replace(model, name, new)
    return len(targets)


def fit_cpu_kernels(model: nn.Module) -> int:
    """bitsandbytes' packed 4-bit CPU kernel (CPUs with AVX512-BF16) needs a layer's output width to be a
    multiple of 32 and fails on the first call otherwise; such layers (only the tiny presets have them,
    every official checkpoint's widths are multiples of 128) take the library's generic path instead.
    The number of layers turned to it."""
    narrow: list[Any] = [module for module in model.modules()
                         if type(module).__name__ == "Linear4bit" and getattr(module, "out_features", 0) % 32
                         and getattr(module, "support_avx512bf16_for_cpu", False)]
    for module in narrow:
        module.support_avx512bf16_for_cpu = False
    return len(narrow)


# What a loaded model is ------------------------------------------------------------------------------
def _module_kind(module: nn.Module) -> Quantization | None:
    kind = type(module).__name__
    if kind in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return Quantization.NF4
    if kind == "Linear8bitLt":
        return Quantization.BNB_INT8
    if type(module) is nn.Linear and _is_subclass_tensor(module.weight):
        return Quantization.INT8
    return None


def _is_subclass_tensor(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def detect(model: nn.Module) -> Quantization:
    """What the loaded model's linears are (a pre-quantized checkpoint says so only by its layers)."""
    kinds = {_module_kind(module) for module in model.modules()} - {None}
    if not kinds:
        return Quantization.NONE
    assert len(kinds) == 1, f"mixed quantizations: {kinds}"
    return kinds.pop()  # type: ignore[return-value]


def vision_quantized(model: nn.Module) -> bool:
    return any(_module_kind(module) is not None for name, module in model.named_modules()
               if is_kept(name, list(_VISION_MODULES)))


def graphs_allowed(model: nn.Module) -> str | None:
    """Why the decode step of this model cannot be captured as a CUDA graph, or None when it can."""
    if detect(model) is Quantization.BNB_INT8:
        return ("bitsandbytes' 8-bit layers synchronise with the host on every call (outlier columns), "
                "which a CUDA graph cannot hold")
    return None


# Bytes ----------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """Bytes of a tensor and whatever a quantized one carries beside it, each storage counted once."""
    if _is_subclass_tensor(tensor):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(_tensor_bytes(getattr(tensor, name), seen) for name in names)
    if tensor.device.type == "meta":
        total = tensor.numel() * tensor.element_size()
    else:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        total = tensor.untyped_storage().nbytes()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit
    if state is not None:
        extra = [state.absmax, state.code]
        nested = getattr(state, "state2", None)  # gone once the CPU kernel has repacked the layer
        if nested is not None:
            extra += [nested.absmax, nested.code]
        total += sum(_tensor_bytes(t, seen) for t in extra if isinstance(t, torch.Tensor))
    scb = getattr(tensor, "SCB", None)  # bitsandbytes 8-bit: one float32 scale per output row
    if isinstance(scb, torch.Tensor):
        total += _tensor_bytes(scb, seen)
    return total


def weight_bytes(model: nn.Module) -> int:
    """The bytes the model's weights take where they lie: parameters and buffers, quantization state
    included, tied weights once."""
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    return sum(_tensor_bytes(t, seen) for t in tensors)
