"""PaliGemma's forward pass one step at a time over the slot KV cache, with the model's own modules.

The language model's own forward runs every layer (Gemma for PaliGemma, Gemma 2 for PaliGemma 2: its
attention, norms and soft-capping stay the library's), writing keys and values through `SlotKVCache`
and attending under a mask built here. The mask keeps PaliGemma's attention exact, per row:
- prefill: the image tokens and the prefix attend to each other both ways (prefix-LM), nothing else;
- decode: the token at index p attends to indices 0..p, and on Gemma 2's sliding layers only to the
  last `sliding_window` of them, as transformers' own masks do.
Greedy outputs therefore equal `model.generate` for the same request alone
(tests/model/test_engine_exactness.py checks it).
"""

from __future__ import annotations

import torch
from transformers import PaliGemmaForConditionalGeneration

from app.engine.kv_cache import DecodeRows, DecodeStep, Prefill, SlotKVCache


class StepModel:
    def __init__(self, model: PaliGemmaForConditionalGeneration, cache: SlotKVCache):
        self.model = model
        self.cache = cache
        self.language_model = model.model.language_model
        text = model.config.text_config
        layer_types = getattr(text, "layer_types", None)
        # Gemma 2 interleaves sliding-window and full layers and takes one mask per kind.
        self.layer_types = set(layer_types) if layer_types else None
        self.sliding_window = getattr(text, "sliding_window", None) if layer_types else None
        self.logit_softcap = getattr(text, "final_logit_softcapping", None)
        self.vocab_size = int(model.lm_head.out_features)
        self.image_token_id = int(model.config.image_token_id)
        self.dtype = model.dtype
        self.device = cache.keys[0].device
        self.scratch = cache.shape.scratch
        self._key_index = torch.arange(cache.shape.length + 1, device=self.device)
        self._blocked = torch.finfo(self.dtype).min

    # Masks -----------------------------------------------------------------------------------------
    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # Additive, not boolean: Gemma 2's eager attention adds the mask to its scores.
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, self._blocked)

    def _attention_masks(self, full: torch.Tensor,
                         sliding: torch.Tensor | None) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.layer_types is None:
            return self._additive(full)
        masks = {"full_attention": self._additive(full)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = self._additive(full if sliding is None else sliding)
        return masks

    # Steps -----------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.lm_head(hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                 masks: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        # PaliGemma counts rotary positions from 1 (see PaliGemmaForConditionalGeneration).
        output = self.language_model(inputs_embeds=embeds, attention_mask=masks, position_ids=positions + 1,
                                     cache=self.cache, use_cache=True)
        hidden: torch.Tensor = output.last_hidden_state
        return hidden

    def prefill(self, rows: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor,
                image_features: torch.Tensor) -> torch.Tensor:
        """Newcomers' prompts into their rows; the logits of each prompt's last token, (b, vocab).

        `input_ids` (b, t) are right-padded to the longest prompt; `image_features` (b, image tokens,
        hidden) replace the `<image>` tokens, in order.
        """
        batch, tokens = input_ids.shape
        positions = torch.arange(tokens, device=self.device).expand(batch, tokens)
        real = positions < lengths[:, None]
        index = torch.where(real, positions, self.scratch)
        # Every key a prompt token sees lies below the longest prompt: attention reads only those.
        self.cache.target = Prefill(rows, index, length=tokens)
        is_image = input_ids == self.image_token_id
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        embeds = embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))
        # Prefix-LM: every prompt token sees every prompt token of its row (the sliding window does not
        # apply inside the bidirectional prefix either).
        keys = self._key_index[:tokens]
        allowed = (keys[None, :] < lengths[:, None])[:, None, None, :].expand(batch, 1, tokens, tokens)
        hidden = self._forward(embeds, positions, self._attention_masks(allowed, None))
        last = hidden[torch.arange(batch, device=self.device), lengths - 1]
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, target: DecodeStep | DecodeRows) -> torch.Tensor:
        """Feed one token per row at its own position (`target` says which rows); the next-token
        logits, (n, vocab). A `DecodeStep` has a fixed shape per row count, which `DecodeGraphs` can
        capture; a `length` above every real row's position limits attention to the keys below it."""
        self.cache.target = target
        positions, length = target.positions, target.length
        embeds = self.language_model.embed_tokens(tokens[:, None])
        keys = self._key_index[None, :length]
        full = keys <= positions[:, None]
        sliding = None
        if self.sliding_window is not None:
            sliding = full & (keys > positions[:, None] - self.sliding_window)
            sliding = sliding[:, None, None, :]
        masks = self._attention_masks(full[:, None, None, :], sliding)
        hidden = self._forward(embeds, positions[:, None], masks)
        return self._logits(hidden[:, -1])
