"""The memory plan for the official checkpoints, offline: parameters against independently published counts,
KV arithmetic against the architectures, quantized bytes against bfloat16, the command and its JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from app.engine.kv_cache import CACHE_MEMORY_SHARE, CacheShape
from app.engine.memory_plan import PlanRequest, plan, quantized_linear_bytes
from app.model.checkpoints import OFFICIAL_IDS, official_checkpoint
from app.model.quantization import Quantization
from app.plan import fit_table, main
from app.settings import SettingsError, load_settings
from app.sizes import parse_bytes

README = Path(__file__).resolve().parents[2] / "README.md"

# Parameter counts published with keras-hub's PaliGemma presets (pali_gemma_presets.py), counted by another
# implementation from the released weights. Keras' embedding has 257,152 rows, the checkpoints' config.json
# 257,216: the plan must count exactly 64 rows of the text width more.
KERAS_HUB_PARAMETERS = {
    "google/paligemma-3b-pt-224": 2_923_335_408,
    "google/paligemma-3b-mix-448": 2_924_220_144,
    "google/paligemma-3b-pt-896": 2_927_759_088,
    "google/paligemma2-3b-pt-224": 3_032_094_960,
    "google/paligemma2-3b-ft-docci-448": 3_032_979_696,
    "google/paligemma2-3b-pt-896": 3_036_518_640,
    "google/paligemma2-10b-mix-224": 9_662_409_456,
    "google/paligemma2-10b-pt-448": 9_663_294_192,
    "google/paligemma2-10b-pt-896": 9_666_833_136,
    "google/paligemma2-28b-pt-224": 27_650_192_112,
}
# The sizes Google announces (the model cards: 3B, 10B, 28B; PaliGemma: 2.92 B).
ANNOUNCED = {"3b": 3.0e9, "10b": 9.7e9, "28b": 27.7e9}


def request(**overrides) -> PlanRequest:
    values = dict(dtype=torch.bfloat16, quantization=Quantization.NONE, quantize_vision=False, rows=32,
                  max_prompt_tokens=256, max_new_tokens=256, prefill_tokens=8192, memory_bytes=None)
    return PlanRequest(**{**values, **overrides})


@pytest.mark.parametrize("model_id", sorted(KERAS_HUB_PARAMETERS))
def test_parameters_of_the_official_checkpoints_match_the_published_counts(model_id):
    official = official_checkpoint(model_id)
    result = plan(model_id, official.config(), request())
    assert result.parameters - KERAS_HUB_PARAMETERS[model_id] == 64 * official.language.hidden
    size = "3b" if "3b" in model_id else model_id.split("-")[1]
    assert result.parameters == pytest.approx(ANNOUNCED[size], rel=0.03)
    # bfloat16: two bytes a parameter, plus the rotary and position-id buffers (a few KiB).
    assert 0 <= result.weight_bytes - 2 * result.parameters < 2**20


def test_every_official_id_is_understood_and_others_are_not():
    for model_id in OFFICIAL_IDS:
        official = official_checkpoint(model_id)
        assert official is not None, model_id
        assert official.image_tokens == {224: 256, 448: 1024, 896: 4096}[official.image_size]
    assert official_checkpoint("google/paligemma2-3b-ft-widgetcap-448") is not None  # ft-<task> by pattern
    for other in ("google/paligemma-10b-pt-224", "google/paligemma2-3b-pt-512", "someone/paligemma2-3b-pt-224",
                  "google/gemma-2b"):
        assert official_checkpoint(other) is None


@pytest.mark.parametrize(("model_id", "layers", "kv_heads", "head_dim"), [
    ("google/paligemma-3b-mix-224", 18, 1, 256),
    ("google/paligemma2-3b-pt-448", 26, 4, 256),
    ("google/paligemma2-10b-pt-448", 42, 8, 256),
    ("google/paligemma2-28b-pt-896", 46, 16, 128),
])
def test_kv_bytes_are_the_runner_arithmetic(model_id, layers, kv_heads, head_dim):
    official = official_checkpoint(model_id)
    result = plan(model_id, official.config(), request(rows=8, max_prompt_tokens=100, max_new_tokens=50))
    assert result.kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 2
    length = official.image_tokens + 150
    assert result.cache == CacheShape(layers=layers, rows=8, kv_heads=kv_heads, length=length, head_dim=head_dim)
    assert result.kv_bytes_per_row == result.kv_bytes_per_token * (length + 1)  # + the scratch index


def test_rows_that_fit_take_the_runners_share_of_what_the_weights_leave():
    model_id = "google/paligemma2-10b-pt-448"
    config = official_checkpoint(model_id).config()
    unbounded = plan(model_id, config, request())
    memory = parse_bytes("24GiB")
    bounded = plan(model_id, config, request(memory_bytes=memory))
    free = memory - bounded.weight_bytes - bounded.reserve_bytes
    assert bounded.cache.rows == int(free * CACHE_MEMORY_SHARE) // unbounded.kv_bytes_per_row < 32
    assert bounded.fits is True and bounded.problem is None
    assert unbounded.fits is None  # no memory given: no verdict


def test_a_model_too_big_for_the_memory_is_refused_with_the_reason():
    model_id = "google/paligemma2-28b-pt-224"
    result = plan(model_id, official_checkpoint(model_id).config(), request(memory_bytes=parse_bytes("24GiB")))
    assert result.fits is False
    assert "weights alone" in result.problem and "do not fit" in result.problem
    assert "NO:" in result.table()


def test_quantized_bytes_against_bfloat16():
    """The issue's targets, nf4 <= 0.35 and int8 <= 0.55 of bfloat16, hold for the layers quantized; the
    whole model keeps its embeddings, lm_head, vision tower and projector in bfloat16 by design."""
    for out_features, in_features in ((16384, 2048), (2048, 16384), (256, 2048)):
        bf16 = quantized_linear_bytes(Quantization.NONE, out_features, in_features, torch.bfloat16)
        assert quantized_linear_bytes(Quantization.INT8, out_features, in_features, torch.bfloat16) <= 0.55 * bf16
        assert quantized_linear_bytes(Quantization.NF4, out_features, in_features, torch.bfloat16) <= 0.35 * bf16
    model_id = "google/paligemma-3b-pt-224"
    config = official_checkpoint(model_id).config()
    parts = {q: plan(model_id, config, request(quantization=q)).weight_bytes_by_part for q in Quantization}
    assert parts[Quantization.INT8]["language model"] <= 0.55 * parts[Quantization.NONE]["language model"]
    assert parts[Quantization.NF4]["language model"] <= 0.35 * parts[Quantization.NONE]["language model"]
    for kept in ("vision tower", "projector", "embeddings"):
        assert parts[Quantization.NF4][kept] == parts[Quantization.NONE][kept]
    vision = plan(model_id, config, request(quantization=Quantization.NF4, quantize_vision=True))
    assert vision.weight_bytes_by_part["vision tower"] <= 0.4 * parts[Quantization.NONE]["vision tower"]


def test_plan_json_document(capsys):
    code = main(["--model", "google/paligemma2-10b-mix-448", "--memory", "24GiB", "--quantization", "nf4",
                 "--max-batch-size", "16", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["model"] == "google/paligemma2-10b-mix-448"
    assert document["quantization"] == "nf4" and document["dtype"] == "bfloat16"
    assert document["image_tokens"] == 1024 and document["rows_requested"] == 16
    assert document["memory_bytes"] == 24 * 2**30 and document["fits"] is True
    assert document["weight_bytes"] == sum(document["weight_bytes_by_part"].values())
    assert document["kv_cache_bytes"] == document["rows_that_fit"] * document["kv_bytes_per_row"]
    assert document["total_bytes"] == (document["weight_bytes"] + document["kv_cache_bytes"]
                                       + document["activation_bytes"] + document["reserve_bytes"])


def test_plan_table_and_the_exit_status_when_it_does_not_fit(capsys):
    assert main(["--model", "google/paligemma2-28b-pt-896", "--memory", "24GiB"]) == 1
    table = capsys.readouterr().out
    assert re.search(r"^weights\s+51\.\d\d GiB", table, re.M)
    assert re.search(r"^fits\s+NO: the weights alone", table, re.M)


def test_plan_reads_a_local_directory(tmp_path, capsys):
    official_checkpoint("google/paligemma2-3b-pt-224").config().save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 3_032_242_416


def test_sizes_and_the_memory_setting():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert parse_bytes("123456") == 123456
    assert load_settings(memory="16GiB").memory == 16 * 2**30
    with pytest.raises(SettingsError, match="PALIGEMMA_MEMORY"):
        load_settings(memory="lots")


def test_readme_fit_table_is_what_plan_prints():
    """README's table of which model fits which GPU is generated (`paligemma-server plan --fit-table`)."""
    text = README.read_text()
    start, end = "<!-- fit-table: paligemma-server plan --fit-table -->", "<!-- /fit-table -->"
    assert start in text and end in text, "README lost its fit table markers"
    shown = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == fit_table(load_settings()), "regenerate it with `paligemma-server plan --fit-table`"


@pytest.mark.parametrize(("preset", "model_id"), [("paligemma-3b-224", "google/paligemma-3b-pt-224"),
                                                  ("paligemma2-10b-448", "google/paligemma2-10b-pt-448")])
def test_the_full_size_presets_are_the_official_architectures(preset, model_id):
    from app.model.checkpoints import architecture

    ours = plan(preset, architecture(preset)[0], request())
    official = plan(model_id, official_checkpoint(model_id).config(), request())
    assert ours.parameters == official.parameters
    assert ours.weight_bytes_by_part == official.weight_bytes_by_part
    assert ours.cache == official.cache and ours.image_tokens == official.image_tokens
