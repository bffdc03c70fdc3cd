"""The batched sampler against the distributions it must draw from.

Each case draws many tokens for one row of logits (the row repeated, one uniform each: the batched
sampler does all of them in one call) and compares the frequencies with the exact filtered distribution
computed here the plain way (temperature, then top-k, then top-p over the sorted vocabulary, as
transformers' generate applies them): every drawn token must lie in the support, and the frequencies must
pass a chi-square test. The uniforms come from a seeded generator, so the outcome is fixed; a sampler off
by a few percent on any token fails it.

Groups of 8 tokens instead of 64, and chunks of 512 instead of 4,096, let a vocabulary of a few thousand
tokens take every path (several chunks, the best groups, more groups, the whole row) at a unit test's
cost; one test checks the real group size on PaliGemma's real vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.engine import sampler as sampler_module
from app.engine.rows import RowTable
from app.engine.sampler import SAMPLING_COLUMNS, Batch, Sampler, sample
from app.engine.sampling_params import SamplingParams


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    monkeypatch.setattr(sampler_module, "GROUP", 8)
    monkeypatch.setattr(sampler_module, "CHUNK", 512)


def batch(temperature, top_k, top_p, uniforms: torch.Tensor, live=None) -> Batch:
    n = uniforms.shape[0]
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float32), (n,)).copy()
    k = np.broadcast_to(np.asarray(top_k, dtype=np.int64), (n,)).copy()
    p = np.broadcast_to(np.asarray(top_p, dtype=np.float32), (n,)).copy()
    mask = np.ones(n, dtype=bool) if live is None else live
    return Batch(torch.from_numpy(t), torch.from_numpy(k), torch.from_numpy(p), uniforms, t, k, p, mask)


def expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution to sample from, computed over the whole sorted vocabulary in float64."""
    scores = logits.double() / temperature
    order = torch.sort(scores, descending=True).indices
    probs = torch.softmax(scores, 0)[order]
    if 0 < top_k < len(probs):
        probs[top_k:] = 0
    probs = probs / probs.sum()
    if top_p < 1:
        probs = torch.where(probs.cumsum(0) - probs < top_p, probs, 0)  # the first always stays
        probs = probs / probs.sum()
    out = torch.zeros_like(probs)
    out[order] = probs
    return out


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, count: int, seed: int = 0):
    uniforms = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rows = logits[None].expand(2000, -1).contiguous()
    return torch.cat([sample(rows[: len(part)], batch(temperature, top_k, top_p, part))
                      for part in uniforms.split(2000)])


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert not counts[probs == 0].any(), f"drew tokens outside the support: {torch.nonzero(counts * (probs == 0))}"
    n = counts.sum()
    # Chi-square over the tokens expected at least 5 times, the rest pooled in one cell.
    big = probs * n >= 5
    observed = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    wanted = torch.cat([probs[big] * n, (probs[~big & (probs > 0)].sum() * n)[None]])
    if wanted[-1] < 5:
        observed, wanted = observed[:-1], wanted[:-1]
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    dof = len(wanted) - 1
    # Wilson-Hilferty: the chi-square quantile at p = 1e-6, so a correct sampler never fails by chance.
    z = 4.75
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof else 0.0
    assert statistic <= limit, (statistic, limit, dof)


def logits_of(kind: str, vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "flat":  # like a random-weight model: no token stands out
        return torch.randn(vocab, generator=generator)
    # Peaked, like a trained model: a few likely tokens over a long tail.
    logits = torch.randn(vocab, generator=generator) * 2
    head = torch.randperm(vocab, generator=generator)[:12]
    logits[head] += torch.linspace(14, 6, 12)
    return logits


CASES = [
    # kind, vocab, temperature, top_k, top_p
    ("peaked", 1500, 1.0, 0, 1.0),  # temperature only: the chunked inverse CDF, a short last chunk
    ("flat", 2300, 0.7, 0, 1.0),
    ("peaked", 2500, 1.0, 40, 1.0),  # top-k among the best groups' tokens
    ("flat", 2000, 1.3, 300, 1.0),  # top-k above MAX_GROUPS: the whole row sorted
    ("peaked", 2500, 0.8, 0, 0.9),  # top-p held by the first candidates
    ("flat", 2000, 1.0, 0, 0.5),  # top-p beyond every candidate set: the whole row
    ("peaked", 2500, 1.2, 60, 0.95),  # both: top-p over what top-k kept
    ("peaked", 2500, 0.5, 1, 1.0),  # top-k 1 is greedy
]


@pytest.mark.parametrize(("kind", "vocab", "temperature", "top_k", "top_p"), CASES)
def test_draws_follow_the_filtered_distribution(kind, vocab, temperature, top_k, top_p):
    logits = logits_of(kind, vocab)
    probs = expected(logits, temperature, top_k, top_p)
    tokens = draw(logits, temperature, top_k, top_p, count=12_000)
    assert_follows(tokens, probs)


def test_top_k_and_top_p_supports_are_exact():
    logits = logits_of("peaked", 2500, seed=3)
    for top_k, top_p in ((5, 1.0), (0, 0.95), (20, 0.99)):
        probs = expected(logits, 1.0, top_k, top_p)
        support = set(torch.nonzero(probs).flatten().tolist())
        assert 1 < len(support) <= 20
        drawn = set(draw(logits, 1.0, top_k, top_p, count=20_000, seed=top_k).tolist())
        assert drawn == support  # each kept token drawn, nothing else


def test_candidates_that_miss_top_p_fall_back_to_the_exact_search(monkeypatch):
    # Flat logits: the best groups hold a sliver of the mass, so top-p 0.9 needs most of the vocabulary.
    logits = logits_of("flat", 2500, seed=4)
    calls: list[tuple[str, int]] = []
    candidates, search = sampler_module._candidates, sampler_module._top_p_floor
    monkeypatch.setattr(sampler_module, "_candidates", lambda rows, *rest: (
        calls.append(("candidates", rows.shape[0])), candidates(rows, *rest))[1])
    monkeypatch.setattr(sampler_module, "_top_p_floor", lambda rows, *rest: (
        calls.append(("search", rows.shape[0])), search(rows, *rest))[1])
    probs = expected(logits, 1.0, 0, 0.9)
    assert (probs > 0).sum() > 1500
    assert_follows(draw(logits, 1.0, 0, 0.9, count=6000), probs)
    assert calls == [("candidates", 2000), ("search", 2000)] * 3  # per batch of 2,000 draws


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 8.0])
def test_the_search_finds_exactly_the_lowest_logit_top_p_keeps(scale):
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    top_p = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99, 0.9999])
    lowest = sampler_module._top_p_floor(logits, torch.softmax(logits, dim=-1), top_p)
    for row in range(6):
        support = expected(logits[row], 1.0, 0, float(top_p[row])) > 0
        assert lowest[row] == logits[row][support].min()
        assert int((logits[row] >= lowest[row]).sum()) == int(support.sum())


def test_greedy_rows_take_the_first_maximum_beside_sampled_rows():
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(5))
    logits[2, [10, 4000]] = 50.0  # a tie: argmax (and generate) take the first
    uniforms = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    tokens = sample(logits, batch([0, 1.0, 0, 0.7, 0, 1.0], [0, 0, 0, 20, 0, 0], [1, 1, 1, 1, 1, 0.5], uniforms))
    greedy = logits.argmax(dim=-1)
    assert tokens[[0, 2, 4]].tolist() == greedy[[0, 2, 4]].tolist() and tokens[2] == 10


def test_a_rows_token_depends_only_on_its_own_logits_parameters_and_uniform():
    logits = torch.randn(8, 2500, generator=torch.Generator().manual_seed(7)) * 3
    temperature = [1.0, 0.0, 0.7, 1.3, 1.0, 0.9, 0.0, 1.0]
    top_k = [0, 0, 30, 0, 5, 0, 0, 300]
    top_p = [1.0, 1.0, 1.0, 0.8, 0.9, 0.95, 1.0, 1.0]
    uniforms = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    together = sample(logits, batch(temperature, top_k, top_p, uniforms))
    for i in range(8):
        alone = sample(logits[i:i + 1], batch(temperature[i], top_k[i], top_p[i], uniforms[i:i + 1]))
        assert alone.item() == together[i].item(), i


def test_an_extreme_uniform_never_picks_a_token_without_mass():
    logits = torch.full((2, 1800), -1e4)
    logits[:, [3, 1799]] = 0.0  # the last token sits in the short last chunk
    for u in (0.0, 1 - 2**-53):
        uniforms = torch.full((2,), u, dtype=torch.float64)
        tokens = sample(logits, batch([1.0, 1.0], [0, 2], [1.0, 0.99], uniforms))
        assert set(tokens.tolist()) <= {3, 1799}


def test_rows_that_are_not_live_cost_no_sampling():
    # A decode step covers idle rows; with every live row greedy, nothing but argmax runs.
    logits = torch.randn(4, 3000)
    uniforms = torch.zeros(4, dtype=torch.float64)
    tokens = sample(logits, batch([0, 5.0, 0, 5.0], [0, 3, 0, 0], [1, 0.2, 1, 1], uniforms,
                                  live=np.array([True, False, True, False])))
    assert tokens[[0, 2]].tolist() == logits.argmax(-1)[[0, 2]].tolist()


def test_a_seeded_request_draws_the_same_tokens_in_any_row_and_company():
    vocab = 2000
    others = torch.randn(5, vocab, generator=torch.Generator().manual_seed(9)) * 2
    mine = torch.randn(vocab, generator=torch.Generator().manual_seed(10)) * 2

    def run(row: int, neighbours: dict[int, SamplingParams]) -> list[int]:
        logits = others.clone()
        logits[row] = mine
        table = RowTable(5, SAMPLING_COLUMNS, torch.device("cpu"))
        sampler = Sampler(table)
        sampler.admit(row, SamplingParams(temperature=0.9, top_p=0.95, seed=1234))
        for other, params in neighbours.items():
            sampler.admit(other, params)
        live = [row, *neighbours]
        return [sampler.select(logits, range(5), live)[0] for _ in range(30)]

    alone = run(0, {})
    assert run(3, {0: SamplingParams(temperature=1.0), 1: SamplingParams(top_k=7, temperature=0.5, seed=1),
                   4: SamplingParams()}) == alone
    assert len(set(alone)) > 3  # it did sample
    # The same request in a prefill (its rows gathered, not rows 0..n-1) draws alike.
    table = RowTable(5, SAMPLING_COLUMNS, torch.device("cpu"))
    sampler = Sampler(table)
    sampler.admit(2, SamplingParams(temperature=0.9, top_p=0.95, seed=1234))
    sampler.admit(4, SamplingParams(temperature=1.0))
    newcomers = torch.stack([mine, others[1]])
    gathered = [sampler.select(newcomers, [2, 4], [0, 1])[0] for _ in range(30)]
    assert gathered == alone


def test_the_best_groups_hold_the_exact_top_of_a_real_size_vocabulary(monkeypatch):
    monkeypatch.setattr(sampler_module, "GROUP", 64)
    logits = torch.randn(4, 257_216, generator=torch.Generator().manual_seed(11)) * 3
    for groups in (16, 51):
        values, ids, known = sampler_module._candidates(logits, groups)
        assert known is not None
        top = logits.topk(int(known.min()))
        assert int(known.min()) >= groups
        assert torch.equal(values[:, : top.values.shape[1]], top.values)
        assert torch.equal(logits.gather(1, ids[:, : top.values.shape[1]]), top.values)
