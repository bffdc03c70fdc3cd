"""The official PaliGemma checkpoints' architectures, as facts, so a memory plan needs no download.

Each fact names where it was read. A checkpoint id is `google/paligemma-3b-{kind}-{res}` (PaliGemma 1) or
`google/paligemma2-{3b,10b,28b}-{kind}-{res}` (PaliGemma 2): `kind` is pt, mix or ft-<task> (e.g.
ft-docci), `res` 224, 448 or 896 px. All of one size share their weights' shapes except the vision
tower's position embeddings, one per image token: (res / 14)^2 = 256, 1024 or 4096.

Sources:
- [hf-config] the checkpoints' `config.json` on the Hugging Face hub (google/paligemma-3b-pt-224,
  google/paligemma2-3b-pt-224, ...): text_config.vocab_size 257216 (Gemma's 256,000 tokens, 1024 loc,
  128 seg, padded to a multiple of 64), image_token_index 257152, projection_dim = the text hidden size.
- [gemma-2b] google/gemma-2b `config.json`: 18 layers, hidden 2048, 8 heads, 1 KV head, head_dim 256,
  intermediate 16384 (PaliGemma 1's language model).
- [pg2-convert] transformers `models/paligemma/convert_paligemma2_weights_to_hf.py`, VARIANT_CONFIGS:
  2b: 26 layers, hidden 2304, intermediate 9216, 8 heads, 4 KV heads, head_dim 256, query scale 256;
  9b: 42 / 3584 / 14336 / 16 / 8 / 256 / 256; 27b: 46 / 4608 / 36864 / 32 / 16 / 128 / 4608 // 32;
  vision: SigLIP So400m, 27 layers, hidden 1152, intermediate 4304, 16 heads, patch 14, no head.
- [keras-hub] keras-hub `models/pali_gemma/pali_gemma_presets.py`: published parameter counts, used as
  an independent check of the plan (tests/unit/test_memory_plan.py): 3B 224/448/896 px 2,923,335,408 /
  2,924,220,144 / 2,927,759,088; PaliGemma 2 3B 224/448/896 3,032,094,960 / 3,032,979,696 /
  3,036,518,640; 10B 9,662,409,456 / 9,663,294,192 / 9,666,833,136; 28B 27,650,192,112. Keras counts a
  257,152-row embedding, 64 rows fewer than the checkpoints' config.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PaliGemmaConfig

from app import demo
from app.model import presets

VOCAB_SIZE = 257_216  # [hf-config]
IMAGE_TOKEN_ID = 257_152  # [hf-config]
PAD_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID = 0, 1, 2  # [hf-config], [pg2-convert]


@dataclass(frozen=True)
class VisionTower:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    source: str


SIGLIP_SO400M = VisionTower(layers=27, hidden=1152, intermediate=4304, heads=16, patch=14,
                            source="pg2-convert")


@dataclass(frozen=True)
class LanguageModel:
    family: str  # "paligemma" (Gemma) or "paligemma2" (Gemma 2)
    size: str  # as in the checkpoint ids: 3b, 10b, 28b
    text_model: str  # transformers' model_type: gemma or gemma2
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    query_pre_attn_scalar: int | None
    source: str


LANGUAGE_MODELS = {
    ("paligemma", "3b"): LanguageModel("paligemma", "3b", "gemma", 18, 2048, 8, 1, 256, 16384, None,
                                       "gemma-2b"),
    ("paligemma2", "3b"): LanguageModel("paligemma2", "3b", "gemma2", 26, 2304, 8, 4, 256, 9216, 256,
                                        "pg2-convert"),
    ("paligemma2", "10b"): LanguageModel("paligemma2", "10b", "gemma2", 42, 3584, 16, 8, 256, 14336, 256,
                                         "pg2-convert"),
    ("paligemma2", "28b"): LanguageModel("paligemma2", "28b", "gemma2", 46, 4608, 32, 16, 128, 36864, 144,
                                         "pg2-convert"),
}

# The ids published by Google on the Hugging Face hub for serving (pt, mix and the DOCCI fine-tunes of
# PaliGemma 2); other `ft-<task>` ids of the same pattern are understood too (OFFICIAL_ID_PATTERN).
OFFICIAL_IDS = (
    *(f"google/paligemma-3b-pt-{res}" for res in (224, 448, 896)),
    *(f"google/paligemma-3b-mix-{res}" for res in (224, 448)),
    *(f"google/paligemma2-{size}-pt-{res}" for size in ("3b", "10b", "28b") for res in (224, 448, 896)),
    *(f"google/paligemma2-{size}-mix-{res}" for size in ("3b", "10b", "28b") for res in (224, 448)),
    "google/paligemma2-3b-ft-docci-448",
    "google/paligemma2-10b-ft-docci-448",
)
OFFICIAL_ID_PATTERN = re.compile(
    r"google/(?P<family>paligemma2?)-(?P<size>3b|10b|28b)-(?P<kind>pt|mix|ft-[a-z0-9-]+)-(?P<res>224|448|896)")


@dataclass(frozen=True)
class OfficialCheckpoint:
    model_id: str
    language: LanguageModel
    vision: VisionTower
    image_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.vision.patch) ** 2

    def config(self) -> PaliGemmaConfig:
        """The checkpoint's PaliGemmaConfig, as its config.json gives it (the fields that shape weights)."""
        text = self.language
        text_config: dict[str, object] = {
            "model_type": text.text_model, "hidden_size": text.hidden, "intermediate_size": text.intermediate,
            "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
            "num_key_value_heads": text.kv_heads, "head_dim": text.head_dim, "vocab_size": VOCAB_SIZE,
            "pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
        }
        if text.text_model == "gemma2":
            text_config.update(query_pre_attn_scalar=text.query_pre_attn_scalar, sliding_window=4096,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        return PaliGemmaConfig(  # type: ignore[call-arg]
            vision_config={
                "model_type": "siglip_vision_model", "hidden_size": self.vision.hidden,
                "intermediate_size": self.vision.intermediate, "num_hidden_layers": self.vision.layers,
                "num_attention_heads": self.vision.heads, "image_size": self.image_size,
                "patch_size": self.vision.patch, "vision_use_head": False,
            },
            text_config=text_config,
            image_token_index=IMAGE_TOKEN_ID,
            vocab_size=VOCAB_SIZE,
            projection_dim=text.hidden,
            hidden_size=text.hidden,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            tie_word_embeddings=True,
        )


def official_checkpoint(model_id: str) -> OfficialCheckpoint | None:
    """The architecture of an official checkpoint id, or None when `model_id` is not one."""
    match = OFFICIAL_ID_PATTERN.fullmatch(model_id.strip())
    if match is None:
        return None
    language = LANGUAGE_MODELS.get((match["family"], match["size"]))
    if language is None:  # e.g. paligemma-10b: PaliGemma 1 came in 3B only
        return None
    return OfficialCheckpoint(model_id, language, SIGLIP_SO400M, int(match["res"]))


def architecture(source: str, revision: str | None = None) -> tuple[PaliGemmaConfig, str]:
    """The config of what PALIGEMMA_MODEL names, without its weights, and where it was read: a built-in
    preset, a local directory's config.json, the official table above (no download), or the hub's
    config.json for any other hub id."""
    preset = presets.PRESETS.get(source)
    if preset is not None:
        return presets.build_config(preset, presets.build_tokenizer(preset)), "preset"
    source = demo.checkpoint_source(source)  # the built-in demo: a checkpoint directory inside the package
    path = Path(source).expanduser()
    if not path.exists():
        official = official_checkpoint(source)
        if official is not None:
            return official.config(), "official table"
    if path.exists():
        return PaliGemmaConfig.from_pretrained(str(path)), str(path / "config.json")
    return PaliGemmaConfig.from_pretrained(source, revision=revision or "main"), "hub config.json"
