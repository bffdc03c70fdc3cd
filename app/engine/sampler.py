"""Choosing every row's next token at once: greedy, or sampled with its own temperature, top-k and top-p.

Each row's sampling parameters live in the runner's row table (written when the row is admitted), so a
step reads them as tensors, like vLLM v1's sampler, instead of looping over requests. Over PaliGemma's
257,216 tokens the costly parts are passes over the whole vocabulary, so each kind of row gets the fewest:
- greedy rows: `argmax` (exactly what `generate` does, ties included), merged in with `torch.where`;
- temperature only: one softmax, then the inverse CDF with one uniform per row, done on chunk sums and
  then within one chunk (a cumulative sum over the vocabulary would cost more than the softmax);
- top-k / top-p: candidates, not a sort of the vocabulary. The maximum of each group of GROUP tokens
  (one cheap pass) ranks the groups; the tokens of the best groups, sorted, hold every token above the
  best group left out, so that prefix of the candidates is exactly the vocabulary's own. Top-k is exact
  with k + 1 groups; top-p when the prefix holds top_p of the mass (measured against the whole
  vocabulary's, from the softmax), the usual case (a trained model's mass sits in a few tokens). Rows where
  it does not find their cut by a search over logit values instead: bucket masses, then one bucket
  sorted. Exact in every case; no row sorts the vocabulary (but for a top-k above MAX_GROUPS groups).
Top-p applies to the distribution left after top-k, as in transformers' generate.

Per-request randomness: a sampled row draws one uniform per token from its own generator
(`random.Random`, seeded from the request's `seed`), and nothing else about its draw depends on the rows
beside it, so the same request with the same seed gives the same output alone or batched with others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.engine.rows import Column, RowTable
from app.engine.sampling_params import SamplingParams

# The inverse CDF over the whole vocabulary: sums of chunks of this many tokens, then one chunk (small
# enough that the per-row work inside a chunk, 32 rows x 1,024, stays under torch's parallel grain).
CHUNK = 1024
# Candidate search: the maximum of each group of this many tokens ranks the groups.
GROUP = 64
# Top-p tries the tokens of this many best groups (1,024 tokens) first.
TOP_P_GROUPS = 16
# Top-k looks among the best k + 1 groups; above this many it sorts the whole row.
MAX_GROUPS = 256
# Top-p's exact search: buckets of logit values whose masses find the one bucket to sort.
BUCKETS = 4096

SAMPLING_COLUMNS = (Column("temperature", torch.float32, 0.0), Column("top_k", torch.long, 0),
                    Column("top_p", torch.float32, 1.0))


@dataclass(frozen=True)
class Batch:
    """The parameters of a step's rows: tensors on the logits' device, and the host copies that decide
    which work runs. `live` marks the rows whose token is wanted (a decode step covers idle rows too)."""

    temperature: torch.Tensor  # (n,) float32, 0: greedy
    top_k: torch.Tensor  # (n,) long, 0: none
    top_p: torch.Tensor  # (n,) float32, 1: none
    uniforms: torch.Tensor  # (n,) float64 in [0, 1): each sampled row's one draw
    host_temperature: np.ndarray
    host_top_k: np.ndarray
    host_top_p: np.ndarray
    live: np.ndarray  # (n,) bool


class Workspace:
    """Buffers for the whole-vocabulary passes, kept between steps: on a CPU a fresh 33 MB tensor per
    step costs page faults (glibc hands such blocks back to the system); CUDA's allocator keeps its own."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, vocab: int, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab or buffer.device != device:
            buffer = self._buffers[name] = torch.empty((rows, vocab), dtype=dtype, device=device)
        return buffer[:rows]


def _buffer(workspace: Workspace | None, name: str, like: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (rows, vocab) buffer shaped like `like`: the workspace's (CPU), else a new one (CUDA)."""
    if workspace is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return workspace.get(name, like.shape[0], like.shape[1], like.device, dtype)


def sample(logits: torch.Tensor, batch: Batch, workspace: Workspace | None = None) -> torch.Tensor:
    """One token per row of `logits` (n, vocab); rows not live get an arbitrary token."""
    n, vocab = logits.shape
    device = logits.device
    sampled = batch.live & (batch.host_temperature > 0)
    greedy = batch.live & ~sampled
    has_k = sampled & (batch.host_top_k > 0) & (batch.host_top_k < vocab)
    has_p = sampled & (batch.host_top_p < 1)
    plain = sampled & ~has_k & ~has_p  # temperature only
    tokens = logits.argmax(dim=-1) if greedy.any() else torch.zeros(n, dtype=torch.long, device=device)
    if not sampled.any():
        return tokens
    inverse_t = torch.where(batch.temperature > 0, 1 / batch.temperature, 1.0)
    probs = None
    if (plain | (has_p & ~has_k)).any():  # the whole vocabulary's distribution is needed
        probs = _softmax(logits, inverse_t, bool((batch.host_temperature[sampled] == 1).all()), workspace)
    if plain.any():
        assert probs is not None
        tokens = torch.where(_on(plain, device), _inverse_cdf(probs, batch.uniforms), tokens)
    k = torch.where((batch.top_k > 0) & (batch.top_k < vocab), batch.top_k, 0)
    # Which way a row goes depends on that row alone (so does its token: a seed gives the same output in
    # any company). Top-k rows: the tokens of the best k + 1 groups (or the whole row, for a large k).
    # Top-p rows without top-k: the best TOP_P_GROUPS groups' tokens, else the exact search.
    limited = np.flatnonzero(has_k)
    if limited.size:
        groups = int(batch.host_top_k[limited].max()) + 1
        index = _index(limited, n, device)
        chosen, _ = _sample_candidates(
            _part(logits, index), _part(inverse_t, index), _part(k, index), _part(batch.top_p, index),
            _part(batch.uniforms, index), None, groups if groups <= MAX_GROUPS else 0, groups - 1)
        tokens[_rows_of(index, n, device)] = chosen
    nucleus = np.flatnonzero(has_p & ~has_k)
    if nucleus.size:
        assert probs is not None
        index = _index(nucleus, n, device)
        chosen, exact = _sample_candidates(
            _part(logits, index), _part(inverse_t, index), _part(k, index), _part(batch.top_p, index),
            _part(batch.uniforms, index), _part(probs, index), TOP_P_GROUPS, 0)
        done = exact.cpu().numpy()
        tokens[_rows_of(index, n, device)[_on(done, device)]] = chosen[_on(done, device)]
        rest = nucleus[~done]
        if rest.size:
            index = _index(rest, n, device)
            rows_logits, rows_probs = _part(logits, index), _part(probs, index)
            lowest = _top_p_floor(rows_logits, rows_probs, _part(batch.top_p, index), workspace)
            weights = torch.mul(rows_probs, rows_logits >= lowest[:, None],
                                out=_buffer(workspace, "scaled", rows_logits))
            tokens[_rows_of(index, n, device)] = _inverse_cdf(weights, _part(batch.uniforms, index))
    return tokens


def _rows_of(index: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) if index is None else index


def _index(rows: np.ndarray, n: int, device: torch.device) -> torch.Tensor | None:
    """`rows` as an index, or None when they are all n rows in order (nothing to gather)."""
    return None if len(rows) == n else torch.from_numpy(rows).to(device)


def _part(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor[index]


def _softmax(logits: torch.Tensor, inverse_t: torch.Tensor, all_ones: bool,
             workspace: Workspace | None) -> torch.Tensor:
    """The rows' distributions over the whole vocabulary, at their temperatures (one pass fewer when every
    sampled row is at temperature 1)."""
    n, vocab = logits.shape
    if workspace is None:
        scaled = logits.float() if all_ones else logits.float() * inverse_t[:, None]
        return torch.softmax(scaled, dim=-1)
    scaled = logits if all_ones else torch.mul(logits, inverse_t[:, None],
                                               out=workspace.get("scaled", n, vocab, logits.device))
    return torch.softmax(scaled, dim=-1, out=workspace.get("probs", n, vocab, logits.device))


def _on(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mask).to(device)


def _candidates(logits: torch.Tensor, groups: int,
                needed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The tokens of each row's `groups` best groups (and the few past the last whole group), sorted by
    logit, descending (only the best `needed`, unless 0): values, token ids, and how many of them lie
    above every token left out (that prefix is exactly the row's own top). `groups` 0, or enough to cover
    the row: the whole row, whose candidates are all known (None)."""
    n, vocab = logits.shape
    whole = vocab // GROUP
    if not groups or groups * GROUP * 2 >= vocab:
        if needed:
            values, order = logits.topk(needed)
        else:
            values, order = logits.sort(dim=-1, descending=True)
        return values, order, None
    main = whole * GROUP
    best = logits[:, :main].reshape(n, whole, GROUP).amax(dim=-1).topk(groups + 1)
    # Every token left out is <= the best group left out.
    bound = best.values[:, groups]
    members = torch.arange(GROUP, device=logits.device)
    ids = (best.indices[:, :groups, None] * GROUP + members).reshape(n, groups * GROUP)
    if main < vocab:
        ids = torch.cat([ids, torch.arange(main, vocab, device=logits.device).expand(n, -1)], dim=1)
    values = logits.gather(1, ids)
    if needed and needed < values.shape[1]:
        values, order = values.topk(needed)
    else:
        values, order = values.sort(dim=-1, descending=True)
    return values, ids.gather(1, order), (values > bound[:, None]).sum(dim=-1)


def _sample_candidates(logits: torch.Tensor, inverse_t: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                       uniforms: torch.Tensor, probs: torch.Tensor | None, groups: int,
                       needed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with top-k and/or top-p: a token each, and whether that row's draw is exact (else the caller
    tries again with more candidates). `probs`: the rows' whole softmax, needed for top-p without top-k;
    `needed`: how many of the best candidates the rows can use (0: all)."""
    values, ids, known = _candidates(logits, groups, needed)
    scaled = values.float() * inverse_t[:, None]
    weights = torch.exp(scaled - scaled[:, :1])  # relative to the top token's
    position = torch.arange(values.shape[1], device=values.device)
    limited = k > 0
    weights = weights.masked_fill(limited[:, None] & (position >= k[:, None]), 0.0)
    cumulative = weights.double().cumsum(dim=-1)
    # Top-p's mass is that of the distribution after top-k: the k tokens', or the whole vocabulary's
    # (in units of the top token's weight: 1 / its probability).
    if probs is not None:
        everything = 1 / probs.gather(1, ids[:, :1]).squeeze(1).double()
    else:
        everything = cumulative[:, -1]
    total = torch.where(limited, cumulative[:, -1], everything)
    cut = top_p.double() * total
    keep = (cumulative - weights < cut[:, None]) | (top_p >= 1)[:, None]
    weights = weights.masked_fill(~keep, 0.0)
    # Exact when the kept tokens all lie in the prefix known to be the row's own top (always, for a
    # whole row).
    if known is None:
        exact = torch.ones_like(limited)
    else:
        last_known = cumulative.gather(1, (known - 1).clamp(min=0)[:, None]).squeeze(1)
        exact = torch.where(limited, k <= known, (top_p >= 1) | (last_known >= cut))
    chosen = _pick(weights, uniforms * weights.double().sum(dim=-1))
    return ids.gather(1, chosen[:, None]).squeeze(1), exact


def _top_p_floor(logits: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """Top-p without top-k, exactly, without sorting the vocabulary: per row, the lowest logit kept (the
    tokens at or above it are the smallest set from the top whose mass reaches top_p). Buckets of logit
    values (a token's bucket never rises as its logit falls) find the bucket where the mass from the top
    passes top_p; only that bucket's tokens are sorted."""
    n = logits.shape[0]
    top = logits.amax(dim=-1, keepdim=True)
    scale = (BUCKETS - 1) / (top - logits.amin(dim=-1, keepdim=True)).float().clamp(min=1e-30)
    distance = torch.sub(top, logits, out=_buffer(workspace, "scaled", logits)).mul_(scale)
    bucket = _buffer(workspace, "bucket", logits, torch.long).copy_(distance)  # 0: the top bucket
    mass = torch.zeros((n, BUCKETS), dtype=probs.dtype, device=probs.device).scatter_add_(1, bucket, probs)
    cumulative = mass.double().cumsum(dim=-1)
    cut = top_p.double()
    # The bucket where the mass from the top first reaches top_p; everything above it is kept.
    boundary = torch.searchsorted(cumulative, cut[:, None]).squeeze(1).clamp(max=BUCKETS - 1)
    before = torch.where(boundary > 0, cumulative.gather(1, (boundary - 1).clamp(min=0)[:, None]).squeeze(1),
                         0.0)
    lowest = torch.empty(n, dtype=logits.dtype, device=logits.device)
    # The boundary buckets' tokens, row by row: a few hundred each (all of a row only if it is constant).
    member_rows, member_ids = torch.nonzero(bucket == boundary[:, None], as_tuple=True)
    counts = torch.bincount(member_rows, minlength=n).tolist()
    for row, members in enumerate(torch.split(member_ids, counts)):
        values, order = logits[row, members].sort(descending=True)
        # The last token kept is the first whose mass, with all above it, reaches top_p.
        through = before[row] + probs[row, members[order]].double().cumsum(0)
        lowest[row] = values[int(torch.searchsorted(through, cut[row]).clamp(max=len(values) - 1))]
    return lowest


def _pick(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the first index whose cumulative weight passes `target` (a uniform times the
    row's total weight). Never an index of zero weight, whatever the rounding."""
    cumulative = weights.double().cumsum(dim=-1)
    index = torch.searchsorted(cumulative, target[:, None], right=True).squeeze(1)
    positive = weights > 0
    width = weights.shape[1]
    first = positive.to(torch.uint8).argmax(dim=-1)
    last = width - 1 - positive.flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(torch.maximum(index, first), last)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over whole rows of `probs`: find the chunk by chunk sums, then the token in it."""
    n, vocab = probs.shape
    main = (vocab // CHUNK) * CHUNK
    sums = probs[:, :main].reshape(n, vocab // CHUNK, CHUNK).sum(dim=-1)
    if main < vocab:
        sums = torch.cat([sums, probs[:, main:].sum(dim=-1, keepdim=True)], dim=1)
    cumulative = sums.double().cumsum(dim=-1)
    target = uniforms * cumulative[:, -1]
    chunk = _pick(sums, target)
    before = torch.where(chunk > 0, cumulative.gather(1, (chunk - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    start = chunk * CHUNK
    offsets = start[:, None] + torch.arange(CHUNK, device=probs.device)
    inside = probs.gather(1, offsets.clamp(max=vocab - 1)).masked_fill(offsets >= vocab, 0.0)
    return start + _pick(inside, target - before)


class Sampler:
    """The runner's sampler: per-row parameters in its row table, per-row generators here."""

    def __init__(self, table: RowTable):
        self.table = table
        self._generators: list[random.Random | None] = [None] * table.rows
        self._workspace = Workspace() if table.device.type == "cpu" else None

    def admit(self, row: int, params: SamplingParams) -> None:
        self.table.write(row, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        # No seed: one from the operating system's randomness (random.Random() seeds itself so).
        self._generators[row] = None if params.greedy else random.Random(params.seed)

    def release(self, row: int) -> None:
        self._generators[row] = None

    def select(self, logits: torch.Tensor, rows: Sequence[int], live: Sequence[int]) -> list[int]:
        """The tokens of `live` (indices into `logits`), where `logits[i]` is table row `rows[i]`."""
        n = logits.shape[0]
        temperature = self.table.host("temperature")
        sampled = [i for i in live if temperature[rows[i]] > 0]
        if not sampled:  # all greedy: the common step, kept short
            greedy: list[int] = logits.argmax(dim=-1).tolist()
            return [greedy[i] for i in live]
        leading = isinstance(rows, range) and rows.start == 0 and rows.step == 1
        host_rows = slice(0, n) if leading else list(rows)
        host = {name: self.table.host(name)[host_rows] for name in ("temperature", "top_k", "top_p")}
        mask = np.zeros(n, dtype=bool)
        mask[list(live)] = True
        uniforms = np.zeros(n)
        for i in sampled:
            generator = self._generators[rows[i]]
            assert generator is not None, "a sampled row without its generator"
            uniforms[i] = generator.random()
        if leading:
            device = {name: self.table[name][:n] for name in host}
        else:
            index = torch.tensor(list(rows), device=logits.device)
            device = {name: self.table[name][index] for name in host}
        batch = Batch(device["temperature"], device["top_k"], device["top_p"],
                      torch.from_numpy(uniforms).to(logits.device), host["temperature"], host["top_k"],
                      host["top_p"], mask)
        tokens: list[int] = sample(logits, batch, self._workspace).tolist()
        return [tokens[i] for i in live]
