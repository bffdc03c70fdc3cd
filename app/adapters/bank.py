"""The adapter slots of one served model: its linear layers wrapped once, at start-up, and their stacked
weights written slot by slot as adapters come and go.

Slot 0 is the base (zeros, never written); slots 1..max_adapters hold one adapter each. Every linear layer
of the language model's decoder layers, the vision tower and the projector is wrapped (`LoraLinear`),
whichever adapters are loaded: the set of layers, and so the decode step's shapes and its captured CUDA
graphs, never change after start-up. The output head and the embeddings are not (PEFT's `all-linear`
leaves the head out too).

Loading an adapter is split so the engine never waits on it: `stage` (any thread: the weights onto the
device) and `write` (the model's thread, between two steps: copies into the slot, a few small kernels
per layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from app.adapters.folder import AdapterFolder, AdapterInvalid
from app.adapters.lora_linear import LoraLinear, SlotRouting

logger = logging.getLogger(__name__)

# How an eager step adds the deltas (app.adapters.lora_linear): per adapter present, over all slots at
# once, or whichever suits the rows' mix.
DecodeForm = Literal["grouped", "dense", "auto"]

# Where adapters may apply, as module-name prefixes of PaliGemmaForConditionalGeneration.
LANGUAGE_PREFIXES = ("model.language_model.layers.",)
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class AdapterRef:
    """What a request carries of its adapter, down to the model runner."""

    name: str
    slot: int
    uid: int  # unique for each load, never reused: part of the image-feature cache's key
    vision: bool  # whether it changes the vision tower or projector (then images get features of their own)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter's weights on the model's device, ready to be written into a slot."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # name -> (a, b, scale)
    rank: int
    vision: bool


def slot_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    """The stacked weights' dtype for PALIGEMMA_LORA_DTYPE: float32, or (auto) the model's."""
    return torch.float32 if setting == "float32" else model_dtype


def wrappable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith(LANGUAGE_PREFIXES + VISION_PREFIXES)


class AdapterBank:
    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype  # of the stacked weights and the deltas (app.adapters.lora_linear)
        self.routing = SlotRouting(max_adapters + 1, device, dtype)
        self.layers: dict[str, LoraLinear] = {}
        for name, module in list(model.named_modules()):
            if wrappable(name, module):
                parent_name, _, child = name.rpartition(".")
                wrapped = LoraLinear(module, self.routing, max_rank)
                setattr(model.get_submodule(parent_name), child, wrapped)
                self.layers[name] = wrapped

    @property
    def bytes(self) -> int:
        """Device memory of the stacked weights (every slot, padded to the rank limit)."""
        return sum(layer.stacked_bytes for layer in self.layers.values())

    def describe(self) -> str:
        return (f"{self.max_adapters} adapter slots of rank <= {self.max_rank} over {len(self.layers)} "
                f"linear layers, in {str(self.dtype).removeprefix('torch.')}: {self.bytes / 2**20:.1f} MiB")

    # Loading ---------------------------------------------------------------------------------------
    def stage(self, folder: AdapterFolder) -> StagedAdapter:
        """Check `folder` fits the slots and put its weights on the device (any thread)."""
        if folder.rank > self.max_rank:
            raise AdapterInvalid(folder.path, f"its rank is {folder.rank}, above PALIGEMMA_MAX_LORA_RANK "
                                              f"({self.max_rank}); raise the limit to serve it")
        outside = sorted(set(folder.modules) - set(self.layers))
        if outside:
            more = f" and {len(outside) - 1} more layers" if len(outside) > 1 else ""
            raise AdapterInvalid(folder.path, f"it adapts {outside[0]}{more}; adapters are served on the "
                                              "linear layers of the language model's decoder layers, the "
                                              "vision tower and the projector only")
        modules = {}
        for name, weights in folder.modules.items():
            layer = self.layers[name]
            given = (weights.a.shape[1], weights.b.shape[0])
            if given != (layer.in_features, layer.out_features):
                raise AdapterInvalid(folder.path, f"{name} is {layer.in_features} -> {layer.out_features} "
                                                  f"in the base, but its LoRA weights are {given[0]} -> "
                                                  f"{given[1]}")
            # float32 on the way: B is scaled there (LoraLinear.write) before its one rounding to the slots'.
            modules[name] = (weights.a.to(self.device, torch.float32),
                             weights.b.to(self.device, torch.float32), weights.scale)
        return StagedAdapter(modules, folder.rank, folder.touches(VISION_PREFIXES))

    def write(self, slot: int, staged: StagedAdapter) -> None:
        """Put `staged` in `slot` (the model's thread, between steps)."""
        self._check_slot(slot)
        for name, layer in self.layers.items():
            weights = staged.modules.get(name)
            if weights is None:
                layer.clear(slot)
            else:
                layer.write(slot, *weights)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear(slot)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.max_adapters:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.max_adapters})")

    # Routing (the runner, before each forward) -----------------------------------------------------
    def route(self, slots: list[int], form: DecodeForm = "grouped") -> None:
        """The next forward's batch item i uses slot `slots[i]`. `auto` (eager decode steps): the dense
        form when two adapters or more are present (a few kernels per layer, whatever the mix), the
        grouped one otherwise (a single adapter's rows, at its own rank)."""
        if form == "auto":
            form = "dense" if len(set(slots) - {0}) >= 2 else "grouped"
        if form == "dense":
            self.routing.dense(torch.tensor(slots, device=self.device), captured=False)
        else:
            self.routing.grouped(slots)

    def route_fixed(self, slots: torch.Tensor) -> None:
        """For a fixed-shape step (a CUDA graph): `slots` is a device buffer the caller refills."""
        self.routing.dense(slots, captured=True)
