"""Built-in PaliGemmas with random weights, made locally without any download.

They exist so a fresh checkout serves at once and every code path runs on a real
`PaliGemmaForConditionalGeneration`. Their outputs are meaningless; everything that shows them says so.

- `tiny`: a 2-layer, 64-wide model (about 0.3 M parameters): the default, for tests and a first run.
- `tiny-448`: `tiny` at PaliGemma's 448 px layout (1024 image tokens), so longer cache rows get exercised.
- `tiny-gemma2`: `tiny` with PaliGemma 2's language model (Gemma 2: sliding-window and full layers,
  soft-capping, eager attention); its window is short (32) so decoding crosses it.
- `tiny-vocab`: `tiny` with PaliGemma's real 257,216-token vocabulary, so that choosing tokens costs what it
  costs with a real checkpoint (sampling at batch scale; its logits are flat, as random weights make them).
- `bench`: about 36 M parameters, large enough that its forward pass dominates a request's cost on a CPU.
- `paligemma-3b-224`: the exact PaliGemma-3B 224 px architecture (SigLIP So400m + Gemma 2B), for GPU
  measurements; 2.9 B parameters, so build it in bfloat16 on a GPU.
- `paligemma2-10b-448`: the exact PaliGemma 2 10B 448 px architecture (Gemma 2 9B), for quantized GPU
  measurements; 9.7 B parameters (19 GB in bfloat16, built on the GPU, then quantized in place).

The tokenizer is byte-level (every string round-trips) and holds the same special, `<locNNNN>`, `<segNNN>`
and `<image>` tokens as Gemma's; the image processor squashes to size x size, bicubic, mean = std = 0.5,
like the real checkpoints' `preprocessor_config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate: int
    # Where the loc tokens start; the real checkpoints put them after Gemma's 256,000 tokens. Presets that
    # do not need the real layout pack them right after the byte tokens to keep the vocabulary small.
    loc_offset: int | None = None
    model_vocab_size: int | None = None
    # Real PaliGemmas tie the output head to the embeddings. With random weights a tied head makes the
    # model repeat the prompt's last token whatever the image, which would make every output the same and
    # every batching test vacuous; the small presets untie it and draw weights at unit scale so that greedy
    # outputs depend on the image and the prompt.
    varied_outputs: bool = True
    # "gemma" (PaliGemma) or "gemma2" (PaliGemma 2).
    text_model: str = "gemma"
    sliding_window: int = 4096

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", "2-layer 64-wide PaliGemma, random weights", 224, 14, 64, 2, 4, 128, 64, 2, 4, 1, 16,
               128),
        Preset("tiny-448", "2-layer 64-wide PaliGemma at 448 px (1024 image tokens), random weights", 448,
               14, 64, 2, 4, 128, 64, 2, 4, 1, 16, 128),
        Preset("tiny-gemma2", "2-layer 64-wide PaliGemma 2 (Gemma 2 language model), random weights", 224,
               14, 64, 2, 4, 128, 64, 2, 4, 1, 16, 128, text_model="gemma2", sliding_window=32),
        Preset("tiny-vocab", "tiny with PaliGemma's real 257,216-token vocabulary, random weights", 224, 14,
               64, 2, 4, 128, 64, 2, 4, 1, 16, 128, loc_offset=256_000, model_vocab_size=257_216),
        Preset("bench", "6-layer PaliGemma of about 36 M parameters, random weights", 224, 14, 384, 6, 6,
               1536, 512, 6, 8, 1, 64, 2048),
        Preset("paligemma-3b-224", "PaliGemma-3B 224 px architecture (SigLIP So400m + Gemma 2B), random "
               "weights", 224, 14, 1152, 27, 16, 4304, 2048, 18, 8, 1, 256, 16384, loc_offset=256_000,
               model_vocab_size=257_216, varied_outputs=False),
        Preset("paligemma2-10b-448", "PaliGemma 2 10B 448 px architecture (SigLIP So400m + Gemma 2 9B), "
               "random weights", 448, 14, 1152, 27, 16, 4304, 3584, 42, 16, 8, 256, 14336, loc_offset=256_000,
               model_vocab_size=257_216, varied_outputs=False, text_model="gemma2", sliding_window=4096),
    )
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, which the ByteLevel pre-tokenizer emits."""
    return pre_tokenizers.ByteLevel.alphabet()


def build_tokenizer(preset: Preset) -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *sorted(_byte_alphabet())):
        vocab[token] = len(vocab)
    if preset.loc_offset is not None:
        while len(vocab) < preset.loc_offset:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
    for token in (*LOC_TOKENS, *SEG_TOKENS, IMAGE_TOKEN):
        vocab[token] = len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS,
                                                                                         IMAGE_TOKEN)])
    # Like Gemma's, loc and seg tokens are ordinary added tokens: `skip_special_tokens` keeps them.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*LOC_TOKENS, *SEG_TOKENS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_processor(preset: Preset) -> PaliGemmaProcessor:
    image_processor = SiglipImageProcessorPil(
        size={"height": preset.image_size, "width": preset.image_size},
        resample=Image.Resampling.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = preset.image_seq_length  # type: ignore[attr-defined]
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(preset))


def build_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> PaliGemmaConfig:
    vocab_size = preset.model_vocab_size or len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token_id, int)
    return PaliGemmaConfig(  # type: ignore[call-arg]
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": preset.vision_hidden,
            "intermediate_size": preset.vision_intermediate,
            "num_hidden_layers": preset.vision_layers,
            "num_attention_heads": preset.vision_heads,
            "image_size": preset.image_size,
            "patch_size": preset.patch_size,
            "vision_use_head": False,
        },
        text_config={
            "model_type": preset.text_model,
            "hidden_size": preset.text_hidden,
            "intermediate_size": preset.text_intermediate,
            "num_hidden_layers": preset.text_layers,
            "num_attention_heads": preset.text_heads,
            "num_key_value_heads": preset.text_kv_heads,
            "head_dim": preset.text_head_dim,
            "vocab_size": vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **(_gemma2_text_config(preset) if preset.text_model == "gemma2" else {}),
        },
        image_token_index=image_token_id,
        vocab_size=vocab_size,
        projection_dim=preset.text_hidden,
        hidden_size=preset.text_hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=not preset.varied_outputs,
    )


def _gemma2_text_config(preset: Preset) -> dict[str, object]:
    """What PaliGemma 2's checkpoints set on top of Gemma's: alternating sliding and full layers."""
    return {
        "query_pre_attn_scalar": preset.text_head_dim,
        "sliding_window": preset.sliding_window,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(preset.text_layers)],
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    }


def build_model(preset: Preset, processor: PaliGemmaProcessor) -> PaliGemmaForConditionalGeneration:
    """Random weights from the caller's torch seed and default dtype/device (set them around this call)."""
    config = build_config(preset, processor.tokenizer)
    # No attention implementation is forced: transformers takes sdpa, or eager for Gemma 2, whose
    # soft-capped attention sdpa cannot compute.
    model = PaliGemmaForConditionalGeneration(config)
    if preset.varied_outputs:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if weight.dim() >= 2 and "embed" not in name:
                    weight.normal_(0.0, weight.shape[-1] ** -0.5)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def loc_ids(processor: PaliGemmaProcessor) -> tuple[int, int]:
    """(first, last + 1) token ids of `<loc0000>`..`<loc1023>` (contiguous in every preset)."""
    first = int(processor.tokenizer.convert_tokens_to_ids(LOC_TOKENS[0]))
    last = int(processor.tokenizer.convert_tokens_to_ids(LOC_TOKENS[-1]))
    assert last - first == len(LOC_TOKENS) - 1
    return first, last + 1
