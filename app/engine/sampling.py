"""Choosing each row's next token from its logits: greedy by default, or sampled per request.

A sampled request draws from its own generator, seeded from its `seed`, so the same request with the
same seed gives the same output whether it runs alone or beside others: no row's draw depends on
another row. Greedy rows take the argmax and are untouched by any sampled neighbour.
"""

from __future__ import annotations

import secrets

import torch

from app.engine.sampling_params import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def _filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
        scores = scores.scatter(0, order[outside], float("-inf"))
    return torch.softmax(scores, dim=-1)


def select_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (rows, vocab)."""
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    for i in sampled:
        probabilities = _filtered_probabilities(logits[i], params[i])
        chosen[i] = torch.multinomial(probabilities, 1, generator=generators[i])[0]
    return chosen.tolist()
