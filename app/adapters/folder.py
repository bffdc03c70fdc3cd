"""A PEFT LoRA adapter folder, read and checked by PEFT's own code against the served base.

PEFT parses the config (`PeftConfig.from_pretrained`), reads the weights (`load_peft_weights`:
`adapter_model.safetensors`, or `.bin`), decides which modules the config targets and with which rank
and scaling (`inject_adapter_in_model`: target_modules, exclude_modules, layers_to_transform,
rank_pattern, alpha_pattern, use_rslora), and maps the saved keys onto those modules
(`set_peft_model_state_dict`, which also renames keys saved under older transformers layouts). It does
all that on a skeleton of the base: the base's architecture built on the meta device, its linear layers
given one-element stand-in weights so that PEFT creates real LoRA weights (float32, on the CPU) beside
them. The served model is never touched, so this runs on any thread while the engine steps.

What comes out is, per targeted linear layer, A (r, in), B (out, r) and the scale PEFT multiplies their
product by, which is all the server needs to add `scale * B @ (A @ x)` itself. The weights stay float32
because PEFT keeps them so (`autocast_adapter_dtype`, its default) and computes the delta in float32
over a bfloat16 base too.

Anything PEFT would compute differently from that sum stops here with `AdapterInvalid`, naming the
folder and the problem: DoRA and the other LoRA variants, non-LoRA PEFT types, modules saved whole
(`modules_to_save`), trained biases, initialisations that rewrite the base weights (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA) and targets that are not linear layers of the language model, vision tower or
projector.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# init_lora_weights values (or prefixes) under which PEFT rewrites the base layer's weights when it
# loads the adapter: one shared base cannot hold them.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_MERGE_HINT = "merge it into the base with PEFT (merge_and_unload) and serve the merged checkpoint instead"


class AdapterInvalid(Exception):
    """The folder cannot be served as a LoRA adapter of this base; the message names it and says why."""

    def __init__(self, folder: Path | str, problem: str):
        super().__init__(f"adapter folder {folder}: {problem}")
        self.folder = str(folder)
        self.problem = problem


@dataclass(frozen=True)
class LoraWeights:
    """One targeted linear layer: its delta is `scale * b @ (a @ x)`."""

    rank: int
    scale: float
    a: torch.Tensor  # (rank, in_features), float32
    b: torch.Tensor  # (out_features, rank), float32


@dataclass(frozen=True)
class AdapterFolder:
    path: Path
    base_model: str | None  # base_model_name_or_path from its config
    modules: dict[str, LoraWeights]  # by module name in the base: model.language_model.layers.0.mlp.up_proj
    notes: tuple[str, ...]  # PEFT's warnings while loading it

    @property
    def rank(self) -> int:
        return max(weights.rank for weights in self.modules.values())

    def touches(self, prefixes: tuple[str, ...]) -> bool:
        return any(name.startswith(prefixes) for name in self.modules)


def read_adapter(path: Path, base_config: Any) -> AdapterFolder:
    """Read the adapter folder at `path` for a base of `base_config` (a PaliGemmaConfig)."""
    from peft import PeftConfig, PeftType, load_peft_weights

    if not path.is_dir():
        raise AdapterInvalid(path, "no such directory" if not path.exists() else "not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterInvalid(path, f"no {CONFIG_FILE}: not a PEFT adapter folder (save one with "
                                   "save_pretrained on a PeftModel)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise AdapterInvalid(path, f"no weights: expected {' or '.join(WEIGHT_FILES)}")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:  # malformed JSON, unknown fields, wrong types: PEFT's words say which
        raise AdapterInvalid(path, f"{CONFIG_FILE} cannot be read: {exc}") from None
    if config.peft_type != PeftType.LORA:
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise AdapterInvalid(path, f"it is a {kind} adapter; only LoRA adapters can be served beside the "
                                   f"base ({_MERGE_HINT})")
    _check_supported(path, config)
    try:
        state_dict = load_peft_weights(str(path), device="cpu")
    except Exception as exc:
        raise AdapterInvalid(path, f"its weights cannot be read: {exc}") from None
    modules, notes = _apply_to_skeleton(path, config, state_dict, base_config)
    if not modules:
        raise AdapterInvalid(path, "it holds no LoRA weights for any layer of the base")
    return AdapterFolder(path, config.base_model_name_or_path or None, modules, notes)


def _check_supported(path: Path, config: Any) -> None:
    """Refuse, before any weight is read, what the batched sum cannot reproduce."""
    for field in dataclasses.fields(config):
        if field.metadata.get("is_lora_variant") and getattr(config, field.name):
            what = "DoRA (use_dora)" if field.name == "use_dora" else f"the LoRA variant {field.name}"
            raise AdapterInvalid(path, f"it uses {what}, which this server does not compute; {_MERGE_HINT}")
    init = config.init_lora_weights
    init_variants: list[str] = next((f.metadata.get("lora_variants", []) for f in dataclasses.fields(config)
                                     if f.name == "init_lora_weights"), [])
    if isinstance(init, str) and init in init_variants:
        raise AdapterInvalid(path, f"it uses the LoRA variant init_lora_weights={init!r}, which this server "
                                   f"does not compute; {_MERGE_HINT}")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterInvalid(path, f"init_lora_weights={init!r}: PEFT rewrites the base weights when it "
                                   "loads such an adapter, so it cannot share a base with others. Save it "
                                   "converted to plain LoRA (save_pretrained(..., "
                                   f"path_initial_model_for_weight_conversion=...)) or {_MERGE_HINT}")
    refusals = {
        "modules_to_save": "it saves whole modules (modules_to_save={}), which replace the base's own",
        "trainable_token_indices": "it trains token embeddings (trainable_token_indices={})",
        "target_parameters": "it targets parameters directly (target_parameters={})",
        "layer_replication": "it replicates layers of the base (layer_replication={})",
        "lora_bias": "it trains a bias on lora_B (lora_bias={})",
    }
    for name, problem in refusals.items():
        value = getattr(config, name, None)
        if value:
            raise AdapterInvalid(path, f"{problem.format(value)}, which this server does not compute; "
                                       f"{_MERGE_HINT}")
    if getattr(config, "bias", "none") != "none":
        raise AdapterInvalid(path, f"it trains the base's biases (bias={config.bias!r}), which would change "
                                   f"the base for every request; {_MERGE_HINT}")


def _skeleton(base_config: Any) -> nn.Module:
    """The base's architecture on the meta device; linear layers hold one-element CPU stand-ins, so
    PEFT puts the LoRA weights it creates beside them on the CPU, in float32."""
    from transformers import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(copy.deepcopy(base_config))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name in ("weight", "bias"):
                meta = getattr(module, name)
                if meta is not None:
                    stand_in = torch.zeros((), dtype=torch.float32).expand(meta.shape)
                    setattr(module, name, nn.Parameter(stand_in, requires_grad=False))
    return model


def _apply_to_skeleton(path: Path, config: Any, state_dict: dict[str, torch.Tensor],
                       base_config: Any) -> tuple[dict[str, LoraWeights], tuple[str, ...]]:
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import Linear as LoraLinearLayer
    from peft.tuners.lora import LoraLayer

    config = copy.deepcopy(config)
    config.inference_mode = True
    model = _skeleton(base_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inject_adapter_in_model(config, model, adapter_name="default")
        except ValueError as exc:  # "Target modules {...} not found in the base model", and the like
            raise AdapterInvalid(path, f"it does not fit this base: {exc}") from None
        try:
            result: Any = set_peft_model_state_dict(model, state_dict, adapter_name="default")
        except RuntimeError as exc:  # size mismatches, with PEFT's list of them
            raise AdapterInvalid(path, f"its weights do not fit this base's layers: {exc}") from None
    notes = tuple(dict.fromkeys(str(w.message) for w in caught if "peft" in w.filename.replace("\\", "/")))
    if result.unexpected_keys:
        raise AdapterInvalid(path, f"it has weights for {len(result.unexpected_keys)} parameters this base "
                                   "does not have or its config does not target, e.g. "
                                   f"{result.unexpected_keys[0]}")
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing:
        raise AdapterInvalid(path, f"its weights lack {len(missing)} LoRA parameters its config targets, "
                                   f"e.g. {missing[0]}")
    modules: dict[str, LoraWeights] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinearLayer) or not isinstance(module.get_base_layer(), nn.Linear):
            raise AdapterInvalid(path, f"it adapts {name} ({type(module.get_base_layer()).__name__}); only "
                                       "linear layers can carry adapters here")
        if module.lora_variant:
            variant = type(module.lora_variant["default"]).__name__
            raise AdapterInvalid(path, f"{name} uses a LoRA variant ({variant}), which this server does not "
                                       f"compute; {_MERGE_HINT}")
        a: torch.Tensor = module.lora_A["default"].weight.detach().to(torch.float32)  # type: ignore[operator]
        b: torch.Tensor = module.lora_B["default"].weight.detach().to(torch.float32)  # type: ignore[operator]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterInvalid(path, f"the weights of {name} hold NaN or infinite values")
        modules[name] = LoraWeights(int(module.r["default"]), float(module.scaling["default"]), a, b)
    return modules, notes
