"""A training-only probe on the image features: dense, additive targets that make every image token say
what its patch holds, so that the mean of the tokens says what the whole scene holds.

Why: trained from scratch together, the language model first learns the answers' priors from the text
alone, and it learns to pick particular image tokens (attention that selects) only after a long plateau;
measured here, a language model fed ideal per-patch features still ignored them for detect and caption
after 400 steps, while one fed features whose mean carries the scene read them within 100. So each image
token is asked, by a linear probe, for sums over its own pixels: per kind of object (12), the pixel count
and the first and second moments of x and y (area, centre, spread: for a known shape, the box), and the
word's ink weighted by which word it is. These are local (a patch's own pixels) and so quick to learn,
and they add up: the mean over tokens is the scene's moments, which plain averaging attention delivers
to every text position. A patch class (background, a kind, the word) is asked too.

Those sums tell where an object is only after a division (its x sum by its pixel count): in the shipped
model's tokens a share-weighted mean of an object's own tokens reads its box hardly better than chance
(40.5 px of edge error against 43.6, `python -m app.demo.readout`), and a word's tokens do not tell which
word it is. Optional targets are constant over what they describe, so that any mix of the right tokens
(which is what attention reads) carries the answer itself: a box term asks every patch an object covers
most for that object's box, `words` asks every patch the word's ink touches which word it is, and
`letters` which of the word's letters has most ink in it (a local question: one letter's shape, not the
whole word's).

The probe is not part of the model: it is dropped after training, and the checkpoint is a plain
`PaliGemmaForConditionalGeneration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from app.demo.world import CANVAS, COLORS, SHAPES, WORDS, Scene, font, object_mask, patch_sums, tight_box

KINDS = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
LETTERS = sorted(set("".join(WORDS)))
WORD_CLASS = len(KINDS) + 1  # patch classes: 0 background, 1..12 the kinds, 13 the word
PATCH_CLASSES = WORD_CLASS + 1
MOMENTS = 5  # count, sum x, sum y, sum x^2, sum y^2 (coordinates in [0, 1])
# Targets are sums over a patch's pixels divided by the patch's pixel count, times this (so the mean over
# an 8 x 8 grid of a scene-wide quantity is about as large as one patch's).
_SCALE = 8.0

_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _coordinates() -> tuple[np.ndarray, np.ndarray]:
    if CANVAS not in _GRID_CACHE:
        ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
        _GRID_CACHE[CANVAS] = (xs, ys)
    return _GRID_CACHE[CANVAS]


@dataclass(frozen=True)
class ProbeTargets:
    classes: torch.Tensor  # (patches,) long: what covers the patch centre
    moments: torch.Tensor  # (patches, 12 * 5) float: per kind, the moments of its pixels in the patch
    word: torch.Tensor  # (patches, 21) float: the word's ink in the patch, in the column of the word
    box: torch.Tensor  # (patches, 4) float: the box of the object with most pixels in the patch, in [0, 1]
    box_share: torch.Tensor  # (patches,) float: that object's share of the patch's pixels (0: none)
    word_class: torch.Tensor  # (patches,) long: the word's index where its ink touches the patch, else -100
    letter_class: torch.Tensor  # (patches,) long: the letter with most ink in the patch (LETTERS), else -100


def _patch_sums(values: np.ndarray, grid: int) -> np.ndarray:
    cell = CANVAS // grid
    return patch_sums(values, grid) / (cell * cell) * _SCALE


def word_ink(scene: Scene, letters: int | None = None) -> np.ndarray:
    """The word's ink in [0, 1] on the canvas; with `letters`, of its first that many letters only."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    assert scene.word is not None
    ImageDraw.Draw(image).text((scene.word.x, scene.word.y), scene.word.text[:letters],
                               font=font(scene.word.font_size), fill=255)
    return np.asarray(image, dtype=np.float32) / 255


def letter_inks(scene: Scene, grid: int) -> np.ndarray:
    """(letters of the word, patches): each letter's ink per patch, as what drawing it adds to the ink of
    the letters before it (the same anchor, so kerning and the letters' positions are the word's own)."""
    assert scene.word is not None
    drawn = [np.zeros((CANVAS, CANVAS), np.float32),
             *(word_ink(scene, n + 1) for n in range(len(scene.word.text)))]
    return np.stack([patch_sums(np.clip(after - before, 0, None), grid) for before, after in pairwise(drawn)])


def targets(scene: Scene, grid: int) -> ProbeTargets:
    xs, ys = _coordinates()
    cell = CANVAS // grid
    centres = np.arange(grid) * cell + cell // 2
    classes = np.zeros((grid, grid), dtype=np.int64)
    moments = np.zeros((grid * grid, len(KINDS), MOMENTS), dtype=np.float32)
    word = np.zeros((grid * grid, len(WORDS) + 1), dtype=np.float32)
    word_class = np.full(grid * grid, -100, dtype=np.int64)
    letter_class = np.full(grid * grid, -100, dtype=np.int64)
    if scene.word is not None:
        ink = word_ink(scene)
        classes[ink[np.ix_(centres, centres)] > 0] = WORD_CLASS
        word[:, WORDS.index(scene.word.text) + 1] = _patch_sums(ink, grid)
        word_class[patch_sums(ink, grid) > 0] = WORDS.index(scene.word.text)
        inks = letter_inks(scene, grid)
        inked = inks.sum(0) > 0
        letter_class[inked] = [LETTERS.index(scene.word.text[i]) for i in inks.argmax(0)[inked]]
    box = np.zeros((grid * grid, 4), dtype=np.float32)
    box_share = np.zeros(grid * grid, dtype=np.float32)
    for obj in scene.objects:
        mask = object_mask(obj).astype(np.float32)
        kind = KINDS.index(obj.name)
        classes[mask[np.ix_(centres, centres)] > 0] = kind + 1
        for j, values in enumerate((mask, mask * xs, mask * ys, mask * xs * xs, mask * ys * ys)):
            moments[:, kind, j] = _patch_sums(values, grid)
        share = patch_sums(mask, grid) / (cell * cell)
        mine = share > box_share
        box[mine] = np.array(tight_box(obj), dtype=np.float32) / CANVAS
        box_share[mine] = share[mine]
    return ProbeTargets(torch.from_numpy(classes.reshape(-1)),
                        torch.from_numpy(moments.reshape(grid * grid, -1)), torch.from_numpy(word),
                        torch.from_numpy(box), torch.from_numpy(box_share), torch.from_numpy(word_class),
                        torch.from_numpy(letter_class))


class VisionProbe(nn.Module):
    def __init__(self, width: int, box_weight: float = 0.0, words: bool = False,
                 letters: bool = False, word_mean: bool = False) -> None:
        super().__init__()
        self.classes = nn.Linear(width, PATCH_CLASSES)
        self.moments = nn.Linear(width, len(KINDS) * MOMENTS)
        self.word = nn.Linear(width, len(WORDS) + 1)
        self.box = nn.Linear(width, 4) if box_weight else None
        self.box_weight = box_weight
        self.word_class = nn.Linear(width, len(WORDS)) if words else None
        self.letter_class = nn.Linear(width, len(LETTERS)) if letters else None
        self.word_mean = nn.Linear(width, len(WORDS)) if word_mean else None

    def loss(self, tokens: torch.Tensor, batch: list[ProbeTargets], box: bool = True) -> torch.Tensor:
        """tokens: (images, patches, width), the image features the language model reads; `box=False`
        leaves the box term out (for `box_loss` on its own)."""
        tokens = tokens.float()
        classes = torch.stack([t.classes for t in batch])
        moments = torch.stack([t.moments for t in batch])
        word = torch.stack([t.word for t in batch])
        loss = F.cross_entropy(self.classes(tokens).flatten(0, 1), classes.flatten())
        # Squared errors summed over a token's outputs: the few non-zero ones are what matters.
        count = tokens.shape[0] * tokens.shape[1]
        loss = loss + F.mse_loss(self.moments(tokens), moments, reduction="sum") / count
        loss = loss + F.mse_loss(self.word(tokens), word, reduction="sum") / count
        if self.box is not None and box:
            loss = loss + self.box_loss(tokens, batch)
        for head, name in ((self.word_class, "word_class"), (self.letter_class, "letter_class")):
            labels = torch.stack([getattr(t, name) for t in batch]).flatten()
            if head is not None and bool((labels >= 0).any()):
                loss = loss + F.cross_entropy(head(tokens).flatten(0, 1), labels)
        if self.word_mean is not None:
            loss = loss + self.word_mean_loss(tokens, torch.stack([t.word_class for t in batch]))
        return loss

    def word_mean_loss(self, tokens: torch.Tensor, word_class: torch.Tensor) -> torch.Tensor:
        """Which word the mean of the word's tokens (those its ink touches) is, in the images that hold
        one. Unlike `words`, no single token is asked for the whole word (a patch may hold one stroke of
        it): measured on the tower alone with `letters`, held-out word accuracy left chance within a few
        hundred steps of 32 word-bearing scenes and was 0.47 and rising at 1500, where `words` with the
        same mean stayed at chance for 1350 (docs/demo.md)."""
        assert self.word_mean is not None
        means = _word_means(tokens, word_class)
        if means is None:
            return tokens.new_zeros(())
        pooled, words = means
        return F.cross_entropy(self.word_mean(pooled), words)

    @torch.no_grad()
    def words_read(self, tokens: torch.Tensor, batch: list[ProbeTargets]) -> tuple[int, int]:
        """(words the word-mean head names right, words) in a batch: with fresh scenes every step, as the
        tower's phase draws them, a held-out measure of how well the tokens read, logged as it trains."""
        if self.word_mean is None:
            return 0, 0
        means = _word_means(tokens.float(), torch.stack([t.word_class for t in batch]))
        if means is None:
            return 0, 0
        pooled, words = means
        return int((self.word_mean(pooled).argmax(-1) == words).sum()), len(words)

    def box_loss(self, tokens: torch.Tensor, batch: list[ProbeTargets]) -> torch.Tensor:
        """The box term, weighed by `box_weight`: in canvas units times _SCALE, as the moments are; a patch
        counts by the object's share of it."""
        assert self.box is not None
        boxes = torch.stack([t.box for t in batch])
        weight = torch.stack([t.box_share for t in batch])
        squared = ((self.box(tokens.float()) - boxes) * _SCALE).square().sum(-1)
        return self.box_weight * (squared * weight).sum() / weight.sum().clamp(min=1.0)


def _word_means(tokens: torch.Tensor, word_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the mean of each word's tokens, which word it is) for the images of a batch that hold one, or
    None when none does (an empty mean would be NaN)."""
    touched = word_class >= 0
    held = touched.any(1)
    if not bool(held.any()):
        return None
    weights = touched[held].float()
    pooled = (tokens[held] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    return pooled, word_class[held].max(1).values


def add_capped_gradient(tokens: torch.Tensor, extra: torch.Tensor, share: float,
                        ratios: list[float]) -> torch.utils.hooks.RemovableHandle:
    """In the next backward through `tokens`, adds `extra` to the gradient that reaches them, scaled down
    where needed so that its norm is at most `share` times that gradient's own; appends the unscaled ratio
    of the two norms to `ratios`.

    Why: the box term's gradient at the image tokens dwarfs the answers' (docs/demo.md), and Adam scales
    every parameter's step by its own gradient's size, so in the vision tower it alone would decide where
    the parameters go. Capped, it steers them at most `share` as much as everything else together.
    (Measured, docs/demo.md: capping it does not change how fast the answers learn; the tower's phase
    alone does.)"""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        rest, own = grad.float().norm(), extra.norm()
        ratios.append(float(own / rest.clamp(min=1e-12)))
        scale = torch.clamp(share * rest / own.clamp(min=1e-12), max=1.0)
        return grad + (extra * scale).to(grad.dtype)
    return tokens.register_hook(hook)
