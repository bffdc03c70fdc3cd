"""Adapter folders the server cannot compute exactly are refused, naming the folder and the problem.

Every folder here is written by PEFT itself (`get_peft_model(...).save_pretrained`), then, for the cases
PEFT would never save (a config that targets modules the base lacks, weights missing or extra), edited
the way a hand-edited or truncated folder would be. The good cases are read the way the server reads
them: every layer's A, B and scale are PEFT's own, including adapters saved under the module layout of
transformers before 4.52.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.adapters.bank import AdapterBank
from app.adapters.folder import AdapterInvalid, read_adapter
from app.model.loader import LoadedModel, load_model
from app.settings import Settings

LANGUAGE_QV = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(Settings(model="tiny"))


def save_peft(directory: Path, preset: str = "tiny", kind: str = "lora", **options) -> Path:
    """A PEFT adapter with random (non-zero) weights, saved as PEFT saves it."""
    from peft import IA3Config, LoraConfig, get_peft_model

    loaded = load_model(Settings(model=preset))
    torch.manual_seed(0)
    if kind == "ia3":
        config = IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])
    else:
        config = LoraConfig(**{"r": 4, "target_modules": LANGUAGE_QV, "init_lora_weights": False, **options})
    get_peft_model(loaded.model, config).save_pretrained(directory, save_embedding_layers=False)
    return directory


def refused(path: Path, base: LoadedModel) -> str:
    with pytest.raises(AdapterInvalid) as caught:
        read_adapter(path, base.model.config)
    message = str(caught.value)
    assert message.startswith(f"adapter folder {path}: "), message
    return message


def edit_config(path: Path, **changes) -> Path:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return path


def test_a_missing_folder_a_file_and_a_folder_without_a_config(tmp_path, tiny):
    assert "no such directory" in refused(tmp_path / "nowhere", tiny)
    (tmp_path / "file").write_text("x")
    assert "not a directory" in refused(tmp_path / "file", tiny)
    assert "no adapter_config.json" in refused(tmp_path, tiny)


def test_a_config_without_weights_and_a_malformed_config(tmp_path, tiny):
    folder = save_peft(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    assert "no weights: expected adapter_model.safetensors or adapter_model.bin" in refused(folder, tiny)
    folder = save_peft(tmp_path / "b")
    (folder / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json cannot be read" in refused(folder, tiny)


def test_dora_and_other_peft_types_are_refused(tmp_path, tiny):
    message = refused(save_peft(tmp_path / "dora", use_dora=True), tiny)
    assert "DoRA (use_dora)" in message and "merge_and_unload" in message
    assert "it is a IA3 adapter; only LoRA adapters" in refused(save_peft(tmp_path / "ia3", kind="ia3"), tiny)


def test_saved_modules_trained_biases_and_base_rewriting_inits_are_refused(tmp_path, tiny):
    assert "modules_to_save" in refused(save_peft(tmp_path / "save", modules_to_save=["lm_head"]), tiny)
    assert "lora_bias" in refused(save_peft(tmp_path / "lora-bias", lora_bias=True), tiny)
    assert "bias='all'" in refused(save_peft(tmp_path / "bias", bias="all"), tiny)
    pissa = refused(save_peft(tmp_path / "pissa", init_lora_weights="pissa"), tiny)
    assert "init_lora_weights='pissa'" in pissa and "path_initial_model_for_weight_conversion" in pissa


def test_targets_the_base_does_not_have_and_weights_of_another_shape(tmp_path, tiny):
    folder = edit_config(save_peft(tmp_path / "other-names"), target_modules=["query_key_value"])
    assert "it does not fit this base" in refused(folder, tiny)
    # An adapter made for the 512-wide `bench` preset, whose module names are the same as tiny's.
    message = refused(save_peft(tmp_path / "bench", preset="bench"), tiny)
    assert "its weights do not fit this base's layers" in message and "size mismatch" in message


def test_weights_missing_for_a_target_or_present_for_no_target(tmp_path, tiny):
    folder = save_peft(tmp_path / "missing")
    weights = load_file(folder / "adapter_model.safetensors")
    dropped = next(key for key in weights if "v_proj.lora_B" in key)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "adapter_model.safetensors")
    assert "its weights lack 1 LoRA parameters its config targets" in refused(folder, tiny)
    folder = save_peft(tmp_path / "extra")
    weights = load_file(folder / "adapter_model.safetensors")
    # Weights for o_proj (the same shape as q_proj's), which the config does not target.
    extra = {k.replace("q_proj", "o_proj"): v.clone() for k, v in weights.items() if "q_proj" in k}
    save_file({**weights, **extra}, folder / "adapter_model.safetensors")
    message = refused(folder, tiny)
    assert "it has weights for 4 parameters this base does not have or its config does not target" in message
    assert "o_proj" in message


def test_layers_that_are_not_served_are_refused_with_where_adapters_apply(tmp_path, tiny):
    bank = AdapterBank(load_model(Settings(model="tiny")).model, max_adapters=2, max_rank=4, device=tiny.device)
    head = read_adapter(save_peft(tmp_path / "head", target_modules=["lm_head"]), tiny.model.config)
    with pytest.raises(AdapterInvalid, match="it adapts lm_head; adapters are served on the linear layers"):
        bank.stage(head)
    embeddings = save_peft(tmp_path / "embed", target_modules=["embed_tokens"])
    assert "only linear layers can carry adapters" in refused(embeddings, tiny)
    wide = read_adapter(save_peft(tmp_path / "r8", r=8), tiny.model.config)
    with pytest.raises(AdapterInvalid, match=r"its rank is 8, above PALIGEMMA_MAX_LORA_RANK \(4\)"):
        bank.stage(wide)


def test_ranks_alphas_and_rslora_scales_are_peft_s(tmp_path, tiny):
    from peft import PeftModel

    folder = save_peft(tmp_path / "patterns", r=8, lora_alpha=16, rank_pattern={"v_proj": 2},
                       alpha_pattern={"layers.1.self_attn.q_proj": 3}, use_rslora=True)
    read = read_adapter(folder, tiny.model.config)
    prefix = "model.language_model.layers"
    expected = {f"{prefix}.0.self_attn.q_proj": (8, 16 / math.sqrt(8)),
                f"{prefix}.1.self_attn.q_proj": (8, 3 / math.sqrt(8)),
                f"{prefix}.0.self_attn.v_proj": (2, 16 / math.sqrt(2)),
                f"{prefix}.1.self_attn.v_proj": (2, 16 / math.sqrt(2))}
    assert {name: w.rank for name, w in read.modules.items()} == {name: r for name, (r, _) in expected.items()}
    assert {name: w.scale for name, w in read.modules.items()} == pytest.approx(
        {name: scale for name, (_, scale) in expected.items()})
    peft_model = PeftModel.from_pretrained(load_model(Settings(model="tiny")).model, str(folder))
    for name, weights in read.modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(weights.a, layer.lora_A["default"].weight)
        assert torch.equal(weights.b, layer.lora_B["default"].weight)
        assert weights.scale == layer.scaling["default"]


def test_an_adapter_saved_under_the_old_transformers_layout_reads_the_same(tmp_path, tiny):
    """Before transformers 4.52, PaliGemma's language model was `language_model.model.*`; PEFT renames the
    keys of such adapters on load, and so does the server (it uses PEFT's loading code)."""
    folder = save_peft(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, old / "adapter_model.safetensors")
    new_read, old_read = read_adapter(folder, tiny.model.config), read_adapter(old, tiny.model.config)
    assert new_read.modules.keys() == old_read.modules.keys()
    for name, weights in new_read.modules.items():
        assert torch.equal(weights.a, old_read.modules[name].a) and torch.equal(weights.b, old_read.modules[name].b)
