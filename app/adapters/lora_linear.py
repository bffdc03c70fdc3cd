"""A linear layer that adds, for each item of the batch, the delta of that item's LoRA adapter.

`LoraLinear` wraps any linear-like module (an `nn.Linear`, or a quantized one that subclasses it): it
calls the module, then adds `scale[s] * B[s] @ (A[s] @ x)` for each batch item's slot `s`, from weights
stacked over every slot and padded to one rank (slot 0 holds zeros: the base). Which slot each batch
item uses is not an argument (the model's own forward calls these layers): the runner sets it on the
`SlotRouting` that all wrapped layers share, before each forward.

Two ways to add the deltas, one result:
- grouped (eager steps: prefills, the vision tower, decode steps run without a CUDA graph): for each
  slot present in the batch, the rows that use it, at that adapter's own rank. Rows of the base, and
  layers an adapter does not target, cost nothing. The runner orders a prefill's rows by slot, so each
  slot's rows are one slice of the batch and its delta is added in place, with no gather or scatter
  of the (large) prefill activations.
- dense (fixed shapes, what a captured CUDA graph replays): one matmul over all slots at once, each row
  keeping only its own slot's part (a one-hot mask), so the step's shapes and
  kernels never depend on which adapters run; writing a slot changes the weights in place, so captured
  graphs see it without a re-capture. It reads every slot's weights once per step, whatever the rows.

The stacked weights, and the deltas, are in the routing's dtype (PALIGEMMA_LORA_DTYPE): the model's own
by default, as vLLM computes LoRA, so that a step in bfloat16 adds each delta with three kernels and no
cast (x @ A over all slots, the slot mask, one GEMM accumulating into the output); or float32, as PEFT
does by default (its `autocast_adapter_dtype`), where a delta is computed in float32 and added to the base
output before it is rounded back to the output's dtype, once. On a float32 model both are the same.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn


class Mode(enum.Enum):
    OFF = "off"  # every row runs the base: the wrapped layers add nothing
    GROUPED = "grouped"
    DENSE = "dense"


class SlotRouting:
    """The slot of each batch item for the next forward, shared by every wrapped layer."""

    def __init__(self, slots: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.slots = slots
        self.dtype = dtype  # of the stacked weights and the deltas
        self.mode = Mode.OFF
        # GROUPED: (slot, the rows of the batch that use it: a slice when they are contiguous).
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        self.mask: torch.Tensor | None = None  # DENSE: (batch, slots) one-hot, in `dtype`
        # DENSE: whether a layer that no loaded adapter adapts may skip its delta (eager steps; a captured
        # graph must hold every layer's, since an adapter loaded later may adapt any of them).
        self.skip_empty = False
        self._ids = torch.arange(slots, device=device)
        self.device = device

    def off(self) -> None:
        self.mode = Mode.OFF

    def grouped(self, slots: list[int]) -> None:
        """Eager forwards: batch item i uses slot `slots[i]`."""
        present = sorted(set(slots) - {0})
        if not present:
            self.mode = Mode.OFF
            return
        self.groups = []
        for slot in present:
            rows = [i for i, s in enumerate(slots) if s == slot]
            if rows[-1] - rows[0] + 1 == len(rows):
                self.groups.append((slot, slice(rows[0], rows[-1] + 1)))
            else:
                self.groups.append((slot, torch.tensor(rows, device=self.device)))
        self.mode = Mode.GROUPED

    def dense(self, slots: torch.Tensor, captured: bool) -> None:
        """The dense form: `slots` (batch,) on the device. Only tensor ops, so a CUDA graph captured after
        this call (`captured`) recomputes the mask from whatever `slots` holds when it is replayed."""
        self.mask = (slots[:, None] == self._ids[None, :]).to(self.dtype)
        self.skip_empty = not captured
        self.mode = Mode.DENSE


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, routing: SlotRouting, rank: int):
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features = int(base.in_features)  # type: ignore[arg-type]
        self.out_features = int(base.out_features)  # type: ignore[arg-type]
        slots, device = routing.slots, routing.device
        self.dtype = routing.dtype
        self.rank = rank
        self.a: torch.Tensor
        self.b: torch.Tensor

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=self.dtype, device=device)

        # Not part of the model's state dict: they are the adapters', written slot by slot. B is kept
        # times its slot's scale (one rounding of the product), so no step multiplies by it; and as
        # (out, slots, rank), so that viewed as (out, slots * rank) the dense form's second matmul is one.
        self.register_buffer("a", zeros(slots, rank, self.in_features), persistent=False)
        self.register_buffer("b", zeros(self.out_features, slots, rank), persistent=False)
        # Each slot's rank in this layer, on the host (0: its adapter does not adapt this layer), so the
        # grouped form never reads the device to know what to skip.
        self.ranks = [0] * slots

    # The wrapped module's parameters, for code that reads them through the layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias  # type: ignore[return-value]

    @property
    def stacked_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))

    # Slots (written between steps, on the model's thread) -----------------------------------------
    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        rank = a.shape[0]
        self.a[slot, :rank].copy_(a)
        self.a[slot, rank:].zero_()
        self.b[:, slot, :rank].copy_(b * scale)
        self.b[:, slot, rank:].zero_()
        self.ranks[slot] = rank

    def clear(self, slot: int) -> None:
        if self.ranks[slot]:
            self.a[slot].zero_()
            self.b[:, slot].zero_()
            self.ranks[slot] = 0

    # Forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base module's output is a tensor of its own (a linear layer's): the deltas go into it in place.
        y: torch.Tensor = self.base(x)
        routing = self.routing
        if routing.mode is Mode.GROUPED:
            return self._grouped(x, y, routing.groups)
        if routing.mode is Mode.DENSE and not (routing.skip_empty and not any(self.ranks)):
            assert routing.mask is not None
            return self._dense(x, y, routing.mask)
        return y

    def _add(self, y: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`y + hidden @ b.T` into y. In y's dtype: one GEMM that accumulates into it. Else (float32 deltas on
        a 16-bit output) summed in float32 and rounded once to y's dtype, as PEFT's `result + delta` then
        `.to(result_dtype)`: an in-place add computes in the wider of its two dtypes."""
        if y.dtype == self.dtype and y.is_contiguous():
            y.view(-1, self.out_features).addmm_(hidden.reshape(-1, hidden.shape[-1]), b.t())
            return y
        return y.add_(F.linear(hidden, b))

    def _grouped(self, x: torch.Tensor, y: torch.Tensor,
                 groups: list[tuple[int, slice | torch.Tensor]]) -> torch.Tensor:
        for slot, rows in groups:
            rank = self.ranks[slot]
            if not rank:
                continue
            a, b = self.a[slot, :rank], self.b[:, slot, :rank]
            if isinstance(rows, slice):  # a slice of the batch: no gather, no scatter
                self._add(y[rows], F.linear(x[rows].to(self.dtype), a), b)
                continue
            delta = F.linear(F.linear(x.index_select(0, rows).to(self.dtype), a), b)
            if y.dtype == self.dtype:
                y.index_add_(0, rows, delta)
            else:
                y.index_copy_(0, rows, (y.index_select(0, rows) + delta).to(y.dtype))
        return y

    def _dense(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        slots, rank = self.routing.slots, self.rank
        hidden = F.linear(x.to(self.dtype), self.a.view(slots * rank, self.in_features))
        # Each row keeps its own slot's part of the hidden state; every other slot's part becomes 0.
        keep = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), slots, 1)
        hidden.view(*hidden.shape[:-1], slots, rank).mul_(keep)
        return self._add(y, hidden, self.b.view(self.out_features, slots * rank))
