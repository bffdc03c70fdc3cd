"""Parsing PaliGemma's generated text into boxes, mask tokens and labels. Pure functions.

Detection output is `<locY1><locX1><locY2><locX2> label ; ...`, segmentation output adds sixteen
`<segNNN>` codebook indices after the four locations. Each location is a bin index in 0..1023 of the
normalised coordinate; big_vision encodes with `round(v * 1023)`, so we decode with `/ 1023` (the exact
inverse; the Hugging Face demo's `/ 1024` shifts every box by up to a tenth of a percent).

Model output is never trusted: whatever parses is returned, whatever does not is dropped and counted,
and nothing here raises on any input string.

Hand-written rather than supervision's `from_paligemma`: that parser divides by 1024, needs a space
after the fourth loc token (so it misses segmentation output) and drops labels with punctuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOC_BINS = 1024
SEG_CODES = 128
SEG_TOKENS_PER_MASK = 16
_LOC_DIVISOR = LOC_BINS - 1

# One object: four loc tokens, then any seg tokens, then a label that runs to the next `;` or to the
# next loc/seg token (the model sometimes forgets the separator). Whitespace between tokens is allowed
# because some tokenizers decode added tokens with spaces around them.
_OBJECT = re.compile(
    r"(?P<locs>(?:<loc\d{4}>\s*){4})"
    r"(?P<segs>(?:<seg\d{3}>\s*)*)"
    r"(?P<label>(?:(?!<loc\d{4}>|<seg\d{3}>)[^;])*)"
)
_NUMBER = re.compile(r"\d+")
_TOKEN_AND_SPACES = re.compile(r"[ \t]*<(?:loc\d{4}|seg\d{3})>[ \t]*")
_DOUBLE_SPACE = re.compile(r" {2,}")


@dataclass(frozen=True)
class Box:
    """A box as (x_min, y_min, x_max, y_max); normalised to [0, 1] or in pixels, as the name says."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def is_empty(self) -> bool:
        return self.x_max <= self.x_min or self.y_max <= self.y_min

    def to_pixels(self, width: int, height: int) -> Box:
        """Scale a normalised box to an image of `width` x `height` pixels, clamped to the image."""

        def scale(value: float, size: int) -> float:
            return round(min(max(value, 0.0), 1.0) * size, 2)

        return Box(scale(self.x_min, width), scale(self.y_min, height), scale(self.x_max, width),
                   scale(self.y_max, height))


@dataclass(frozen=True)
class ParsedObject:
    label: str
    box: Box  # normalised
    mask_tokens: tuple[int, ...] | None
    # Why no mask can be made from this object (None when mask_tokens are complete and the box valid).
    mask_problem: str | None


@dataclass(frozen=True)
class ParsedOutput:
    objects: list[ParsedObject]
    dropped: int  # object-like fragments that could not be parsed (empty box, bad bins)


def decode_box(bins: list[int]) -> Box:
    """Four bins in PaliGemma's order (y_min, x_min, y_max, x_max) -> a normalised (x, y, x, y) box."""
    y_min, x_min, y_max, x_max = (b / _LOC_DIVISOR for b in bins)
    return Box(x_min, y_min, x_max, y_max)


def encode_box(box: Box) -> str:
    """The inverse of `decode_box`, as loc tokens: how a box is written in a PaliGemma target."""
    values = (box.y_min, box.x_min, box.y_max, box.x_max)
    return "".join(f"<loc{round(min(max(v, 0.0), 1.0) * _LOC_DIVISOR):04d}>" for v in values)


def _numbers(tokens: str) -> list[int]:
    return [int(n) for n in _NUMBER.findall(tokens)]


def _mask_problem(seg_codes: list[int]) -> str | None:
    if len(seg_codes) != SEG_TOKENS_PER_MASK:
        return f"expected {SEG_TOKENS_PER_MASK} <seg> tokens after the box, got {len(seg_codes)}"
    if any(code >= SEG_CODES for code in seg_codes):
        return f"a <seg> index is outside 0..{SEG_CODES - 1}"
    return None


def parse_objects(text: str) -> ParsedOutput:
    """All `<loc>x4 [<seg>...] label` groups in `text`, in order, by one rule for every task: an object
    needs four bins in range, a box with max > min on both axes and a label; anything else is dropped
    and counted. Its mask tokens may still be unusable (`mask_problem` says why); its box stands."""
    objects: list[ParsedObject] = []
    dropped = 0
    for match in _OBJECT.finditer(text):
        bins = _numbers(match["locs"])
        label = " ".join(match["label"].split())
        if any(b >= LOC_BINS for b in bins) or not label:
            dropped += 1
            continue
        box = decode_box(bins)
        if box.is_empty:
            dropped += 1
            continue
        seg_codes = _numbers(match["segs"])
        tokens = tuple(seg_codes) if seg_codes else None
        problem = _mask_problem(seg_codes) if seg_codes else None
        objects.append(ParsedObject(label=label, box=box, mask_tokens=tokens, mask_problem=problem))
    return ParsedOutput(objects=objects, dropped=dropped)


def strip_location_tokens(text: str) -> str:
    """The text of an output without its loc/seg tokens, for the plain-text fields of every endpoint.
    Spaces the tokens leave behind collapse to one; other whitespace (OCR's line breaks) is kept."""
    return _DOUBLE_SPACE.sub(" ", _TOKEN_AND_SPACES.sub(" ", text)).strip()

