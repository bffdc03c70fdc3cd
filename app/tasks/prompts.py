"""Building PaliGemma task prefixes from validated request fields.

The prefixes follow Google's prompt system instructions (also big_vision's PaliGemma README):
`caption {lang}`, `describe {lang}`, `answer {lang} {question}`, `ocr`, `detect a ; b`, `segment a ; b`.
The processor-level layout (`<image>` x N, `<bos>`, prefix, `\n`) is added by the model layer, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from app.errors import InvalidRequest


class Task(str, Enum):
    CAPTION = "caption"
    VQA = "vqa"
    OCR = "ocr"
    DETECT = "detect"
    SEGMENT = "segment"
    GENERATE = "generate"


# A language code as PaliGemma's mix checkpoints were trained on: ISO 639-1, optionally with a region or
# script (`zh`, `pt-BR`, `zh-Hant`). The model does not validate it, so a typo would silently answer in
# some other language; refusing malformed codes early is the only help we can give.
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
_SEPARATOR = ";"
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class PromptLimits:
    max_objects: int = 16
    max_text_chars: int = 1000


def _clean_text(value: str, param: str, limits: PromptLimits) -> str:
    """Collapse whitespace (a newline would end the prefix early) and bound the length."""
    text = " ".join(value.split())
    if not text:
        raise InvalidRequest(f"`{param}` must not be empty.", param=param)
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(
            f"`{param}` must be at most {limits.max_text_chars} characters. Given: {len(text)}.", param=param
        )
    if any(ord(ch) < 32 for ch in text):
        raise InvalidRequest(f"`{param}` must not contain control characters.", param=param)
    if _REPLACEMENT in text:
        # Undecodable bytes never get here (app.api.forms refuses them), so a U+FFFD was sent as such:
        # some decoding step on the client's side already lost characters, and the model would read noise.
        raise InvalidRequest(
            f"`{param}` contains U+FFFD, the replacement character: the text was damaged by a decoding "
            "step before it was sent. Send the original text as UTF-8.",
            param=param,
        )
    return text


def language_code(value: str) -> str:
    code = value.strip()
    if not _LANGUAGE.match(code):
        raise InvalidRequest(
            f"`language` must be a language code such as en, es, fr, de, ja or pt-BR. Given: {value[:40]!r}.",
            param="language",
        )
    return code


def split_objects(values: list[str], limits: PromptLimits) -> list[str]:
    """Objects arrive as repeated fields, one `a ; b` string, or both: flatten, clean, bound."""
    objects: list[str] = []
    for value in values:
        for part in value.split(_SEPARATOR):
            if part.strip():
                objects.append(_clean_text(part, "objects", limits))
    if not objects:
        raise InvalidRequest(
            "`objects` must name at least one object, e.g. objects=cat or objects='cat ; dog'.",
            param="objects",
        )
    if len(objects) > limits.max_objects:
        raise InvalidRequest(
            f"`objects` may name at most {limits.max_objects} objects. Given: {len(objects)}.",
            param="objects",
        )
    return objects


def caption_prompt(language: str, long: bool) -> str:
    return f"{'describe' if long else 'caption'} {language_code(language)}"


def vqa_prompt(question: str, language: str, limits: PromptLimits) -> str:
    return f"answer {language_code(language)} {_clean_text(question, 'question', limits)}"


def ocr_prompt() -> str:
    return "ocr"


def detect_prompt(objects: list[str], limits: PromptLimits) -> str:
    return "detect " + f" {_SEPARATOR} ".join(split_objects(objects, limits))


def segment_prompt(objects: list[str], limits: PromptLimits) -> str:
    return "segment " + f" {_SEPARATOR} ".join(split_objects(objects, limits))


# What the Hugging Face examples put before the prefix; the server adds both itself (PromptEncoder).
_LEADING_CONTROL = re.compile(r"^(?:\s*(?:<image>|<bos>))+")


def raw_prompt(prompt: str, limits: PromptLimits) -> str:
    """The prefix as given, without the `<image>`/`<bos>` tokens written in front of it in the Hugging
    Face examples (the server adds them; sent again they would be read as text)."""
    return _clean_text(_LEADING_CONTROL.sub("", prompt), "prompt", limits)
