"""A training-only target on the language model's attention: where the answer is about a part of the
image, one head is asked to look at that part.

Why: the boxes are the last thing the model learns. Its loc error stays at the prior's for the first
half of training (docs/demo.md, "Longer schedules, tried"): to write an object's box, a position must
pick that object's image tokens out of 64 by the words of the prompt (attention that selects), and the
loss on the loc tokens alone finds that only after a long plateau. So at every position that predicts a
`<loc>` or `<seg>` token of an object, one head of one layer is trained to attend to the object's image
tokens, each in proportion to the share of the object's pixels in its patch; at the positions that read
the word (OCR), to the word's ink. An attention that averages over the object's patches in proportion
to its pixels is also what turns the per-patch moments the vision probe asks for (app.demo.probe) into
the object's centre and extent.

The target is a cross-entropy between that distribution and the head's attention over every key the
position sees (so the mass it puts on text tokens counts against it too). It needs no change to the
model: a pre-hook on the layer's attention keeps its input, and the head's scores are recomputed from it
(the layer's own projections and rotary embedding) for the few positions that are trained. The checkpoint
is a plain `PaliGemmaForConditionalGeneration`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.gemma.modeling_gemma import rotate_half

from app.demo.world import patch_sums


def patch_shares(mask: np.ndarray, grid: int) -> np.ndarray:
    """The share of the mask's pixels in each patch of a `grid` x `grid` layout, row-major (sums to 1)."""
    sums = patch_sums(mask.astype(np.float32), grid)
    return sums / max(float(sums.sum()), 1.0)


class AttentionPointer:
    """Keeps the input of one attention layer of the language model while the model runs in training mode
    (not while a quick evaluation generates), and scores one of its heads against where it should look."""

    def __init__(self, model: nn.Module, layer: int = -1, head: int = 0) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn  # type: ignore[union-attr,index]
        self.head = head
        self.kv_head = head // self.attention.num_key_value_groups
        self.inputs: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
        self._handle = self.attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs.append((hidden, kwargs["position_embeddings"]))

    def remove(self) -> None:
        self._handle.remove()
        self.inputs.clear()

    def loss(self, call: int, rows: torch.Tensor, positions: torch.Tensor, image_tokens: int,
             targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the head's attention at (rows, positions) of the `call`-th forward pass
        kept, against `targets` (n, image_tokens) over the first `image_tokens` keys (the image's)."""
        hidden, (cos, sin) = self.inputs[call]
        attention = self.attention
        width = attention.head_dim
        selected = hidden[rows, positions]  # (n, hidden)
        query = attention.q_proj(selected)[:, self.head * width:(self.head + 1) * width]
        keys = attention.k_proj(hidden)[..., self.kv_head * width:(self.kv_head + 1) * width]
        keys = keys[rows]  # (n, L, d)
        # The rotary embedding as the layer applies it (cos/sin: (rows or 1, length, d)).
        cos = cos[rows if cos.shape[0] > 1 else torch.zeros_like(rows)]  # (n, L, d)
        sin = sin[rows if sin.shape[0] > 1 else torch.zeros_like(rows)]
        picked = torch.arange(len(rows))
        query = query * cos[picked, positions] + rotate_half(query) * sin[picked, positions]
        keys = keys * cos + rotate_half(keys) * sin
        scores = (query[:, None, :].float() * keys.float()).sum(-1) * attention.scaling  # (n, L)
        # Every position trained is the prompt's last or in the answer: it sees exactly the keys up to itself.
        later = torch.arange(hidden.shape[1])[None, :] > positions[:, None]
        log_attention = F.log_softmax(scores.masked_fill(later, float("-inf")), dim=-1)
        return -(targets * log_attention[:, :image_tokens]).sum()
