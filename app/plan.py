"""`paligemma-server plan`, and the same plan run at start-up before any weight is loaded.

    paligemma-server plan --model google/paligemma2-10b-mix-448 --memory 24GiB --quantization nf4 [--json]

Offline for every official checkpoint id (app.model.checkpoints), the presets and local directories; any
other hub id reads its config.json from the hub. Defaults are the server's settings' defaults
(PALIGEMMA_* variables set in the environment apply too), with bfloat16, the GPU serving dtype.
At start-up the server plans for its own settings and the memory it finds (or PALIGEMMA_MEMORY), logs
the table, and refuses to start, with that table, when the model cannot fit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import PaliGemmaConfig

from app.adapters.bank import slot_dtype
from app.engine.memory_plan import MemoryPlan, PlanRequest, plan
from app.lifecycle import StartupError
from app.model.checkpoints import OFFICIAL_IDS, architecture
from app.model.quantization import SETTING_VALUES, Quantization
from app.settings import Settings, SettingsError, load_settings
from app.sizes import gib, parse_bytes

logger = logging.getLogger(__name__)


class ModelDoesNotFit(StartupError):
    """The memory plan says the model cannot be served in the memory there is."""


def available_memory(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """What the device has free now: CUDA's own count, or the host's MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _quantization_saved(config: object) -> Quantization | None:
    """What a checkpoint saved quantized holds, from its config.json's quantization_config."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    get = saved.get if isinstance(saved, dict) else lambda key, default=None: getattr(saved, key, default)
    if get("load_in_4bit", False):
        return Quantization.NF4
    if get("load_in_8bit", False):
        return Quantization.BNB_INT8
    return Quantization.INT8 if str(get("quant_method", "")).endswith("torchao") else None


def plan_for(settings: Settings, dtype: torch.dtype, memory: int | None, device_type: str,
             config: PaliGemmaConfig | None = None) -> MemoryPlan:
    if config is None:
        config, _ = architecture(settings.model, settings.revision)
    quantization = _quantization_saved(config) or Quantization(settings.quantization)
    request = PlanRequest(dtype=dtype, quantization=quantization, quantize_vision=settings.quantize_vision,
                          rows=settings.max_batch_size, max_prompt_tokens=settings.max_prompt_tokens,
                          max_new_tokens=settings.max_new_tokens, prefill_tokens=settings.prefill_tokens,
                          memory_bytes=memory, device_type=device_type,
                          adapter_slots=settings.max_adapters + 1 if settings.adapters_enabled else 0,
                          lora_rank=settings.max_lora_rank,
                          lora_dtype=slot_dtype(settings.lora_dtype, dtype))
    return plan(settings.model, config, request)


def startup_plan(settings: Settings, device: torch.device, dtype: torch.dtype) -> MemoryPlan | None:
    """The plan for this server's settings on `device`; refuses (ModelDoesNotFit) when it cannot fit.
    None when the model's config cannot be read: loading it fails next, and says why."""
    try:
        config, _ = architecture(settings.model, settings.revision)
    except (OSError, ValueError):
        return None
    memory = settings.memory if settings.memory is not None else available_memory(device)
    result = plan_for(settings, dtype, memory, device.type, config)
    source = "PALIGEMMA_MEMORY" if settings.memory is not None else f"free on {device}"
    if result.fits is False:
        raise ModelDoesNotFit(
            f"{settings.model} does not fit in {gib(memory)} ({source}): {result.problem}.\n"
            f"{result.table()}\n"
            "Fixes: PALIGEMMA_QUANTIZATION=int8 or nf4, fewer rows (PALIGEMMA_MAX_BATCH_SIZE), shorter rows "
            "(PALIGEMMA_MAX_NEW_TOKENS, PALIGEMMA_MAX_PROMPT_TOKENS), a smaller prefill step "
            "(PALIGEMMA_PREFILL_TOKENS), or a bigger GPU; `paligemma-server plan` tries settings offline.")
    logger.info("memory plan (%s):\n%s", source, result.table())
    return result


# Which model fits which GPU (README's "Serving a real checkpoint") -----------------------------------
FIT_TABLE_MEMORY = ("16GiB", "24GiB", "40GiB", "48GiB", "80GiB", "141GiB")
FIT_TABLE_MODELS = tuple(f"google/paligemma{family}-{size}-pt-{res}"
                         for family, size in (("", "3b"), ("2", "3b"), ("2", "10b"), ("2", "28b"))
                         for res in (224, 448, 896))
FIT_TABLE_ORDER = (Quantization.NONE, Quantization.INT8, Quantization.NF4)
FIT_TABLE_MIN_ROWS = 8  # fewer requests at once than this wastes most of a GPU's decode step


def fit_table(settings: Settings) -> str:
    """A Markdown table: for each official architecture and GPU memory, the least quantization that fits
    with `settings` (bfloat16) and at least FIT_TABLE_MIN_ROWS rows of KV cache (else the one that fits
    the most rows), and how many rows fit."""
    memories = " | ".join(m.replace("GiB", " GiB") for m in FIT_TABLE_MEMORY)
    lines = [f"| model (pt, mix and ft alike) | {memories} |", "|---" * (len(FIT_TABLE_MEMORY) + 1) + "|"]
    for model in FIT_TABLE_MODELS:
        cells = []
        for memory in FIT_TABLE_MEMORY:
            fitting = [result for method in FIT_TABLE_ORDER
                       if (result := plan_for(settings.model_copy(update={"model": model,
                                                                          "quantization": method.value}),
                                              torch.bfloat16, parse_bytes(memory), "cuda")).fits]
            enough = [r for r in fitting if r.cache.rows >= FIT_TABLE_MIN_ROWS]
            best = enough[0] if enough else max(fitting, key=lambda r: r.cache.rows, default=None)
            cells.append("does not fit" if best is None
                         else f"{best.request.quantization.value}, {best.cache.rows} rows")
        name = model.removeprefix("google/").replace("-pt-", " ")
        lines.append(f"| {name} px | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The command ----------------------------------------------------------------------------------------
def _parser(defaults: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma-server plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model,
                        help=f"an official id ({OFFICIAL_IDS[0]}, ...), a preset or a local directory")
    parser.add_argument("--memory", type=parse_bytes, default=defaults.memory,
                        help="the GPU's memory, e.g. 24GiB or 80GB (no verdict without it)")
    parser.add_argument("--quantization", choices=SETTING_VALUES, default=defaults.quantization)
    parser.add_argument("--quantize-vision", action="store_true", default=defaults.quantize_vision)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default=defaults.dtype if defaults.dtype != "auto" else "bfloat16")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--prefill-tokens", type=int, default=defaults.prefill_tokens)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where it will run (the CUDA runtime's reserve is counted on cuda)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    parser.add_argument("--list", action="store_true", help="print the official checkpoint ids and exit")
    parser.add_argument("--fit-table", action="store_true",
                        help="print README's table of which model fits which GPU memory, and exit")
    return parser


def main(argv: list[str]) -> int:
    try:
        defaults = load_settings()
    except SettingsError as exc:
        print(f"paligemma-server plan: {exc}", file=sys.stderr)
        return 2
    args = _parser(defaults).parse_args(argv)
    if args.list:
        print("\n".join(OFFICIAL_IDS))
        return 0
    if args.fit_table:
        print(fit_table(defaults))
        return 0
    try:
        settings = load_settings(model=args.model, quantization=args.quantization,
                                 quantize_vision=args.quantize_vision, max_batch_size=args.max_batch_size,
                                 max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                 prefill_tokens=args.prefill_tokens,
                                 default_max_new_tokens=min(defaults.default_max_new_tokens,
                                                            args.max_new_tokens))
        result = plan_for(settings, getattr(torch, args.dtype), args.memory, args.device)
    except (SettingsError, OSError, ValueError) as exc:
        print(f"paligemma-server plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0 if result.fits is not False else 1
