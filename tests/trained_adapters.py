"""LoRA adapters trained here, in seconds, with PEFT, on the random-weight presets.

Each adapter is trained for a few steps to make the model say its own sentence about some pictures, so
its greedy outputs differ from the base's (the tests assert they do: a comparison with an adapter that
changes nothing would prove nothing), then saved with PEFT's `save_pretrained`, exactly as a fine-tune
made with PEFT (the Trainer, the QLoRA recipes) is. The kinds cover what the server must compute: the
language model's attention only, attention and MLP with per-layer ranks and alphas, and everything
linear including the vision tower and the projector with rsLoRA scaling, at ranks 4, 8 and 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.model.inputs import ImageTransform, PromptEncoder
from app.model.loader import LoadedModel, load_model
from app.settings import Settings
from tests.images import photo
from tests.trained_model import fit

LANGUAGE_ATTENTION = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@dataclass(frozen=True)
class AdapterKind:
    name: str
    options: dict[str, Any]  # LoraConfig arguments
    sentence: str  # what it is trained to say
    vision: bool  # whether it changes the vision tower or projector


KINDS = (
    AdapterKind("attention", {"r": 4, "lora_alpha": 8, "target_modules": LANGUAGE_ATTENTION},
                "the attention adapter speaks", False),
    AdapterKind("attention-mlp", {
        "r": 8, "lora_alpha": 16,
        "target_modules": r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
        "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"o_proj": 4}}, "mlp too: 1 2 3", False),
    AdapterKind("everything", {"r": 16, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
                "it sees differently", True),
)
KIND = {kind.name: kind for kind in KINDS}
PROMPTS = ("caption en",)


def train_adapter(preset: str, kind: AdapterKind, directory: Path, steps: int = 3, seed: int = 0,
                  base_model_name: str | None = None) -> Path:
    """Train `kind` on `preset`'s base for a few Adam steps and save it with PEFT into `directory`."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(Settings(model=preset))
    encoder = PromptEncoder.from_processor(loaded.processor)
    transform = ImageTransform.from_processor(loaded.processor)
    tokenizer = loaded.processor.tokenizer
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, LoraConfig(init_lora_weights="gaussian", **kind.options))
    target = tokenizer(kind.sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = [(encoder.encode(prompt), target, transform(photo(64 + 8 * i, 48, seed=100 + i))[None])
            for i, prompt in enumerate(PROMPTS)]
    fit(model, rows, steps, lr=5e-2)
    model.peft_config["default"].base_model_name_or_path = base_model_name or preset
    # No embedding layers are trained; saying so keeps PEFT from looking the base up on the hub.
    model.save_pretrained(directory, save_embedding_layers=False)
    return directory


def merged_model(preset: str, folder: Path) -> LoadedModel:
    """The base with the adapter merged in by PEFT (`merge_and_unload`): the reference to compare with."""
    import dataclasses

    from peft import PeftModel

    loaded = load_model(Settings(model=preset))
    merged = PeftModel.from_pretrained(loaded.model, str(folder)).merge_and_unload()
    merged.eval()
    return dataclasses.replace(loaded, model=merged)
