"""Loading the model and its processor: a built-in preset, a hub id or a local directory.

Checkpoints go through `from_pretrained` (the hub library reads `HF_TOKEN` and honours `HF_HUB_OFFLINE`
itself). Everything the rest of the service needs to know about the checkpoint is read from it here,
never hard-coded: image size, image-token count, eos ids, dtype, device.
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from app import demo
from app.lifecycle import StartupError
from app.model import presets
from app.model.quantization import (
    Quantization,
    detect,
    fit_cpu_kernels,
    loading_config,
    quantize_in_place,
    vision_quantized,
    weight_bytes,
)
from app.model.sources import ModelUnavailable, explain
from app.settings import Settings

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "model {name!r} has RANDOM weights: its outputs are meaningless. It exists to exercise the service; "
    "set PALIGEMMA_MODEL to a checkpoint (e.g. google/paligemma2-3b-mix-224) for real answers."
)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: PaliGemmaForConditionalGeneration
    processor: PaliGemmaProcessor
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    # What the model is, when the server knows (the built-in demo says what world it was trained on).
    about: str | None
    # A mask decoder that belongs to the checkpoint (the demo's own VQ-VAE), used when
    # PALIGEMMA_MASK_DECODER is not set.
    bundled_mask_decoder: Path | None
    image_size: int
    image_seq_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    parameters: int
    load_seconds: float
    quantization: Quantization = Quantization.NONE
    vision_quantized: bool = False
    weight_bytes: int = 0  # measured where the weights lie, quantization state included


class DeviceUnavailable(StartupError):
    """PALIGEMMA_DEVICE asks for a GPU this process cannot use; the message says why and what to do."""


def nvidia_devices(root: Path = Path("/")) -> list[str]:
    """Signs of an NVIDIA GPU on this machine (or in this container), whatever CUDA makes of them."""
    found = sorted(glob.glob(str(root / "dev" / "nvidia[0-9]*")))
    if (root / "proc" / "driver" / "nvidia").exists():
        found.append(str(root / "proc" / "driver" / "nvidia"))
    return found


def _cuda_problem() -> str:
    """Why torch cannot use CUDA here, in words an operator can act on."""
    if not torch.version.cuda:
        return (f"this torch ({torch.__version__}) is a CPU build; install a CUDA build (the GPU image, or "
                "`make install` on a machine with nvidia-smi)")
    try:
        torch.cuda.init()
    except Exception as exc:  # torch's own words: no driver, driver too old, no device...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        reason = "torch sees no CUDA device"
    return (f"CUDA {torch.version.cuda} cannot be used: {reason}. Check that the GPU is passed to the "
            "container (`--gpus all`, Compose's device reservation, Kubernetes' nvidia.com/gpu) and that the "
            f"driver supports CUDA {torch.version.cuda} (`nvidia-smi`)")


def resolve_device(setting: str, root: Path = Path("/")) -> torch.device:
    """The device PALIGEMMA_DEVICE names. `cuda` without a usable GPU is an error that says why; `auto`
    falls back to the CPU, loudly when the machine has NVIDIA devices that CUDA could not use."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        devices = nvidia_devices(root)
        if devices:
            logger.warning(
                "PALIGEMMA_DEVICE=auto: NVIDIA devices are present (%s) but %s. FALLING BACK TO THE CPU, "
                "orders of magnitude slower. Set PALIGEMMA_DEVICE=cuda to make this an error, or cpu to "
                "run on the CPU on purpose.", ", ".join(devices), _cuda_problem())
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        devices = nvidia_devices(root)
        seen = (f"NVIDIA devices present: {', '.join(devices)}" if devices
                else "no NVIDIA device is visible to this process (no /dev/nvidia*)")
        raise DeviceUnavailable(f"PALIGEMMA_DEVICE={setting} but no GPU can be used ({seen}): "
                                f"{_cuda_problem()}. Or set PALIGEMMA_DEVICE=cpu (or auto) for the CPU.")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"PALIGEMMA_DEVICE={setting} but this process sees {count} GPU(s) "
                                f"(cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES and "
                                "NVIDIA_VISIBLE_DEVICES")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # bfloat16 is what PaliGemma was trained in and halves GPU memory; CPUs run float32 much faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def _eos_ids(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor) -> tuple[int, ...]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = processor.tokenizer.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return tuple(int(i) for i in ids)


# A preset's weights come from torch's global random generator and default dtype, both process-wide: two
# builds at once (a second app loading while an abandoned start-up still builds, as tests do) would draw
# from one stream and give the same seed different weights. One build at a time.
_PRESET_BUILD = threading.Lock()


def _from_preset(preset: presets.Preset, device: torch.device, dtype: torch.dtype, seed: int,
                 quantization: Quantization, quantize_vision: bool):
    processor = presets.build_processor(preset)
    with _PRESET_BUILD:
        torch.manual_seed(seed)
        # Build directly on the target device and dtype: the 3B preset would not fit twice in host memory.
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with device:
                model = presets.build_model(preset, processor)
        finally:
            torch.set_default_dtype(previous)
    # Layer by layer where the model lies: at most one layer's unquantized copy more.
    quantize_in_place(model, quantization, quantize_vision)
    return model, processor


def _from_pretrained(source: str, revision: str | None, device: torch.device, dtype: torch.dtype,
                     quantization: Quantization, quantize_vision: bool):
    try:
        processor = PaliGemmaProcessor.from_pretrained(source, revision=revision or "main")
        # A checkpoint saved quantized carries its quantization_config and loads as saved.
        config = PaliGemmaConfig.from_pretrained(source, revision=revision or "main")
        saved = getattr(config, "quantization_config", None)
        if saved is not None and quantization is not Quantization.NONE:
            logger.warning("%s was saved quantized (%s): it loads as saved, PALIGEMMA_QUANTIZATION=%s does "
                           "not apply", source, _method_name(saved), quantization.value)
        extra = {} if saved is not None else {
            "quantization_config": loading_config(quantization, quantize_vision)}
        # No attn_implementation: transformers then takes sdpa wherever the architecture supports it and
        # eager for PaliGemma 2's Gemma 2 layers, whose soft-capped attention sdpa cannot compute (asking
        # for sdpa there is an error at load time).
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            source, revision=revision or "main", dtype=dtype, device_map=str(device),
            **{k: v for k, v in extra.items() if v is not None},
        )
    # Missing files, unknown repositories, gated ones, no network: OSError; a malformed id or config:
    # ValueError. Anything else (out of memory, say) keeps its traceback.
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(explain(source, revision, exc, list(presets.PRESETS))) from exc
    return model, processor


def _method_name(config: object) -> str:
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def _parameters(model: PaliGemmaForConditionalGeneration) -> int:
    """Weights counted as the architecture has them: bitsandbytes' 4-bit layers store two a byte."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None else param.numel()
    return total


def load_model(settings: Settings, device: torch.device | None = None) -> LoadedModel:
    """Load what the settings name on `device` (default: PALIGEMMA_DEVICE resolved)."""
    started = time.perf_counter()
    device = device or resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    preset = presets.PRESETS.get(settings.model)
    is_demo = settings.model == demo.MODEL_NAME
    quantization = Quantization(settings.quantization)
    if preset is not None:
        model, processor = _from_preset(preset, device, dtype, settings.seed, quantization,
                                        settings.quantize_vision)
    else:
        # The demo is an ordinary checkpoint directory inside the package.
        source = demo.checkpoint_source(settings.model)
        model, processor = _from_pretrained(source, None if is_demo else settings.revision, device, dtype,
                                            quantization, settings.quantize_vision)
    model.eval()
    fit_cpu_kernels(model)
    # Batched generation is only exact with left padding (right padding changes greedy outputs).
    processor.tokenizer.padding_side = "left"

    vision = model.config.vision_config
    loaded = LoadedModel(
        name=settings.model,
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        random_weights=preset is not None,
        about=demo.ABOUT if is_demo else None,
        bundled_mask_decoder=demo.WEIGHTS_DIR / demo.MASK_DECODER_FILE if is_demo else None,
        image_size=int(vision.image_size),
        image_seq_length=int(processor.image_seq_length),
        eos_token_ids=_eos_ids(model, processor),
        pad_token_id=int(processor.tokenizer.pad_token_id),
        parameters=_parameters(model),
        load_seconds=time.perf_counter() - started,
        quantization=detect(model),
        vision_quantized=vision_quantized(model),
        weight_bytes=weight_bytes(model),
    )
    logger.info(
        "loaded %s: %.1f M parameters, %s on %s, weights %s (%.1f MiB), %d px, %d image tokens, in %.1f s",
        loaded.name, loaded.parameters / 1e6, str(dtype).removeprefix("torch."), device,
        loaded.quantization.value + (" vision too" if loaded.vision_quantized else ""),
        loaded.weight_bytes / 2**20, loaded.image_size, loaded.image_seq_length, loaded.load_seconds,
    )
    if loaded.random_weights:
        logger.warning(RANDOM_WEIGHTS_WARNING.format(name=loaded.name))
    if loaded.about:
        logger.info(loaded.about)
    return loaded
