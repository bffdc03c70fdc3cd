"""The adapter slots' dtype (PALIGEMMA_LORA_DTYPE) and their memory in the plan.

- float32 slots on a bfloat16 layer add what PEFT adds by default: the delta in float32, summed with the
  base output in float32 and rounded once (its `autocast_adapter_dtype`), exactly, both forms;
- slots in the model's dtype (the default) stay within that dtype's rounding of the exact delta;
- the memory plan counts the slots to the byte of a real AdapterBank, and the KV cache rows it plans
  shrink by them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from app.adapters.bank import AdapterBank
from app.adapters.lora_linear import LoraLinear, SlotRouting
from app.engine.memory_plan import PlanRequest, plan
from app.model.checkpoints import architecture
from app.model.loader import load_model
from app.model.quantization import Quantization
from app.settings import Settings

IN, OUT, RANK, SLOTS = 64, 96, 8, 4


def _layer(dtype: torch.dtype, lora_dtype: torch.dtype) -> tuple[LoraLinear, dict[int, tuple]]:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(dtype)
    layer = LoraLinear(base, SlotRouting(SLOTS, torch.device("cpu"), lora_dtype), RANK)
    adapters = {}
    for slot, (rank, scale) in {1: (8, 2.0), 2: (4, 0.5), 3: (6, 1.25)}.items():
        a, b = torch.randn(rank, IN) * 0.2, torch.randn(OUT, rank) * 0.2
        layer.write(slot, a, b, scale)
        adapters[slot] = (a, b, scale)
    return layer, adapters


def _route(layer: LoraLinear, slots: list[int], form: str) -> None:
    if form == "dense":
        layer.routing.dense(torch.tensor(slots), captured=True)
    else:
        layer.routing.grouped(slots)


SLOTS_OF_ROWS = [2, 0, 1, 1, 3, 2, 0, 3]


def _exact(layer: LoraLinear, adapters: dict[int, tuple], x: torch.Tensor) -> torch.Tensor:
    """The base output plus each row's delta, in float64 from the same bfloat16 base output."""
    with torch.no_grad():
        exact = layer.base(x).double()
    for row, slot in enumerate(SLOTS_OF_ROWS):
        if slot:
            a, b, scale = adapters[slot]
            exact[row] += (x[row].double() @ a.double().T) @ (b.double() * scale).T
    return exact


@pytest.mark.parametrize("form", ["grouped", "dense"])
def test_float32_slots_on_a_bfloat16_layer_add_what_peft_adds(form):
    """PEFT's Linear.forward by default: result + lora_B(lora_A(x.to(float32))) * scaling, then cast back
    to the result's dtype: one rounding of an exact-enough sum, so within half a bfloat16 step of it."""
    layer, adapters = _layer(torch.bfloat16, torch.float32)
    assert layer.a.dtype == layer.b.dtype == torch.float32
    x = torch.randn(len(SLOTS_OF_ROWS), IN).to(torch.bfloat16)
    _route(layer, SLOTS_OF_ROWS, form)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    exact = _exact(layer, adapters, x)
    # bfloat16 has 8 significant bits: one rounding is within 2**-8 of the value, relatively.
    error = ((got.double() - exact).abs() / exact.abs().clamp(min=1e-3)).max()
    assert error <= 2**-8 + 1e-6


@pytest.mark.parametrize("form", ["grouped", "dense"])
def test_slots_in_the_model_dtype_stay_within_its_rounding(form):
    layer, adapters = _layer(torch.bfloat16, torch.bfloat16)
    assert layer.a.dtype == layer.b.dtype == torch.bfloat16
    x = torch.randn(len(SLOTS_OF_ROWS), IN).to(torch.bfloat16)
    _route(layer, SLOTS_OF_ROWS, form)
    with torch.inference_mode():
        got = layer(x).double()
        base = layer.base(x).double()
    exact = _exact(layer, adapters, x)
    assert (got - base).abs().max() > 0.1  # the deltas are there
    # A, B and x @ A rounded to bfloat16 too: a few steps of 2**-8, never a wrong delta.
    torch.testing.assert_close(got, exact, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])
@pytest.mark.parametrize("lora_dtype", [None, torch.float32])
def test_the_plan_counts_the_adapter_slots_to_the_byte(preset, lora_dtype):
    dtype = torch.bfloat16
    loaded = load_model(Settings(model=preset, dtype="bfloat16"))
    bank = AdapterBank(loaded.model, max_adapters=3, max_rank=8, device=loaded.device,
                       dtype=lora_dtype or dtype)
    config, _ = architecture(preset)
    without = PlanRequest(dtype, Quantization.NONE, False, 64, 64, 32, 8192, memory_bytes=None, device_type="cpu")
    request = dataclasses.replace(without, adapter_slots=4, lora_rank=8, lora_dtype=lora_dtype)
    planned = plan(preset, config, request)
    assert planned.adapter_bytes == bank.bytes > 0
    assert planned.total_bytes - plan(preset, config, without).total_bytes == bank.bytes
    assert planned.as_dict()["adapter_bytes"] == bank.bytes
    assert "adapter slots (3 of rank 8)" in planned.table()
    # With a memory limit, the slots come out of what the KV cache may take: fewer rows fit.
    memory = planned.weight_bytes + 2 * bank.bytes + 12 * planned.kv_bytes_per_row
    fewer = plan(preset, config, dataclasses.replace(request, memory_bytes=memory))
    more = plan(preset, config, dataclasses.replace(without, memory_bytes=memory))
    assert fewer.cache.rows < more.cache.rows
