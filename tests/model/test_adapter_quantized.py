"""LoRA adapters over a quantized base (PALIGEMMA_QUANTIZATION int8: torchao, nf4: bitsandbytes, real
layers on the CPU): the slots wrap the quantized linear layers as they wrap plain ones, and the engine's
greedy tokens for requests with an adapter, batched with a base request, equal PEFT's own model (the
adapter loaded unmerged over the same quantized layers, `PeftModel.from_pretrained`) running `generate`
on each alone. Merging is no reference here: folding B @ A into quantized weights changes them."""

from __future__ import annotations

import dataclasses

import pytest
from peft import PeftModel

from app.adapters.bank import AdapterBank, AdapterRef
from app.adapters.folder import read_adapter
from app.model.loader import load_model
from app.settings import Settings
from tests.model.test_engine_exactness import Driver, generate_alone, make_input
from tests.trained_adapters import KIND, train_adapter

PROMPTS = ["caption en", "answer en what is this?", "ocr"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_adapter("tiny", KIND["attention-mlp"], tmp_path_factory.mktemp("quantized") / "attention-mlp")


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_adapters_on_quantized_layers_equal_peft_on_the_same_quantized_model(folder, method):
    settings = Settings(model="tiny", quantization=method)
    reference = load_model(settings)
    reference = dataclasses.replace(reference, model=PeftModel.from_pretrained(reference.model, folder).eval())
    loaded = load_model(settings)
    bank = AdapterBank(loaded.model, max_adapters=2, max_rank=16, device=loaded.device)
    staged = bank.stage(read_adapter(folder, loaded.model.config))
    bank.write(1, staged)
    adapter = AdapterRef("attention-mlp", 1, uid=1, vision=staged.vision)
    assert all(type(layer.base).__name__ in ("Linear", "Linear4bit") for layer in bank.layers.values())

    driver = Driver(loaded, rows=4, prefill_token_budget=10_000, adapters=bank)
    items = [make_input(loaded, prompt, seed) for seed, prompt in enumerate(PROMPTS)]
    seqs = [driver.submit(dataclasses.replace(item, adapter=adapter), 10) for item in items]
    base = driver.submit(items[0], 10)
    driver.loop.run_until_idle()
    for item, seq in zip(items, seqs, strict=True):
        assert seq.output_tokens == generate_alone(reference, item, 10)
    bank.routing.off()  # `generate` on the served model: every wrapped layer as its quantized base
    assert base.output_tokens == generate_alone(loaded, items[0], 10)  # the slots add nothing to base rows
    assert base.output_tokens != seqs[0].output_tokens  # and the adapter changes what the model says
