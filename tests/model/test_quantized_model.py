"""Quantized PaliGemmas, real bitsandbytes and torchao layers on the CPU: the plan counts their bytes exactly,
both ways of loading quantize the same layers, checkpoints saved quantized load as saved, the vision tower
stays in the dtype unless asked, and the step engine's greedy tokens equal `generate` of the same quantized
model on each request alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from app.engine.memory_plan import PlanRequest, plan
from app.model.checkpoints import architecture
from app.model.loader import load_model
from app.model.quantization import Quantization, graphs_allowed, quantize_in_place, weight_bytes
from app.settings import Settings
from tests.model.test_engine_exactness import check_schedule


def quantized_names(model: nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            or (type(module) is nn.Linear and type(module.weight).__name__ == "Int8Tensor")}


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])
@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("vision", [False, True])
def test_the_plan_counts_the_bytes_of_real_quantized_layers(preset, method, vision):
    loaded = load_model(Settings(model=preset, quantization=method, quantize_vision=vision))
    config, _ = architecture(preset)
    planned = plan(preset, config, PlanRequest(loaded.dtype, Quantization(method), vision, 4, 64, 32, 8192, None))
    assert loaded.quantization is Quantization(method)
    assert loaded.vision_quantized is vision
    assert loaded.weight_bytes == weight_bytes(loaded.model) == planned.weight_bytes
    assert loaded.parameters == planned.parameters
    assert planned.quantized_layers == len(quantized_names(loaded.model)) > 0
    names = quantized_names(loaded.model)
    assert not any(name.startswith("lm_head") for name in names)
    assert any(name.startswith("model.vision_tower") for name in names) is vision
    assert any(name.startswith("model.multi_modal_projector") for name in names) is vision


@pytest.mark.parametrize("method", ["none", "int8", "nf4"])
def test_the_plan_counts_bfloat16_models_too(method):
    """In bfloat16 torchao keeps float32 scales and Gemma's embedding scale follows the dtype."""
    loaded = load_model(Settings(model="tiny-gemma2", dtype="bfloat16", quantization=method))
    config, _ = architecture("tiny-gemma2")
    planned = plan("tiny-gemma2", config, PlanRequest(loaded.dtype, Quantization(method), False, 4, 64, 32, 8192,
                                                      None))
    assert loaded.weight_bytes == planned.weight_bytes


def test_vision_tower_projector_and_lm_head_stay_in_the_dtype_by_default():
    loaded = load_model(Settings(model="tiny", quantization="nf4"))
    model = loaded.model
    for module in (*model.model.vision_tower.modules(), *model.model.multi_modal_projector.modules(),
                   model.lm_head):
        if isinstance(module, nn.Linear):
            assert type(module) is nn.Linear and module.weight.dtype == loaded.dtype
    assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_checkpoint_quantizes_the_same_layers_as_a_preset(tmp_path, method):
    """`from_pretrained` with the quantization config and `quantize_in_place` agree layer for layer."""
    plain = load_model(Settings(model="tiny"))
    plain.model.save_pretrained(tmp_path)
    plain.processor.save_pretrained(tmp_path)
    from_checkpoint = load_model(Settings(model=str(tmp_path), quantization=method))
    in_place = load_model(Settings(model="tiny", quantization=method))
    assert quantized_names(from_checkpoint.model) == quantized_names(in_place.model)
    assert from_checkpoint.weight_bytes == in_place.weight_bytes
    assert from_checkpoint.quantization is Quantization(method)


def test_a_checkpoint_saved_quantized_loads_as_saved(tmp_path, caplog):
    saved = load_model(Settings(model="tiny", quantization="nf4"))
    plain = load_model(Settings(model="tiny"))
    # Save through the library's own path: a checkpoint quantized at load carries its quantization_config.
    plain.model.save_pretrained(tmp_path / "plain")
    plain.processor.save_pretrained(tmp_path / "plain")
    quantized = load_model(Settings(model=str(tmp_path / "plain"), quantization="nf4"))
    quantized.model.save_pretrained(tmp_path / "nf4")
    quantized.processor.save_pretrained(tmp_path / "nf4")
    again = load_model(Settings(model=str(tmp_path / "nf4")))  # PALIGEMMA_QUANTIZATION=none
    assert again.quantization is Quantization.NF4
    assert quantized_names(again.model) == quantized_names(saved.model)
    assert again.weight_bytes == quantized.weight_bytes
    with caplog.at_level("WARNING"):
        load_model(Settings(model=str(tmp_path / "nf4"), quantization="int8"))
    assert "loads as saved" in caplog.text


def test_bitsandbytes_8bit_layers_are_not_captured_in_cuda_graphs():
    model = load_model(Settings(model="tiny")).model
    assert graphs_allowed(model) is None
    quantize_in_place(model, Quantization.BNB_INT8, quantize_vision=False)
    assert "bitsandbytes' 8-bit" in graphs_allowed(model)
    assert graphs_allowed(load_model(Settings(model="tiny", quantization="nf4")).model) is None
    assert graphs_allowed(load_model(Settings(model="tiny", quantization="int8")).model) is None


def test_importing_bitsandbytes_reaches_no_network():
    """bitsandbytes 0.50 asks the hub for a kernel on some CPUs at import; the server imports it offline."""
    guard = (
        "import socket\n"
        "real = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    host = address[0] if isinstance(address, tuple) else ''\n"
        "    if host and not host.startswith('127.') and host not in ('::1', 'localhost'):\n"
        "        raise SystemExit(f'connected to {address}')\n"
        "    return real(self, address)\n"
        "socket.socket.connect = connect\n"
        "from app.model.quantization import import_bitsandbytes\n"
        "import_bitsandbytes()\n"
        "import huggingface_hub.constants as hub\n"
        "print('offline restored', hub.HF_HUB_OFFLINE)\n")
    result = subprocess.run([sys.executable, "-c", guard], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "offline restored False" in result.stdout


@pytest.fixture(scope="module", params=[("tiny", "int8"), ("tiny", "nf4"), ("tiny-gemma2", "nf4"),
                                        ("tiny-gemma2", "int8")])
def quantized_model(request):
    preset, method = request.param
    return load_model(Settings(model=preset, quantization=method))


def test_engine_equals_generate_of_the_same_quantized_model(quantized_model):
    check_schedule(quantized_model, seed=1, count=8)


def test_weight_bytes_are_measured_after_the_cpu_kernel_repacks_a_layer():
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit layer on its first call (absmax to bfloat16,
    no nested state): measuring must still work, and the bytes stay within the plan's 5 %."""
    loaded = load_model(Settings(model="bench", quantization="nf4"))
    layer = loaded.model.model.language_model.layers[0].mlp.up_proj
    with torch.inference_mode():
        layer(torch.randn(2, layer.in_features))
    assert weight_bytes(loaded.model) == pytest.approx(loaded.weight_bytes, rel=0.05)
