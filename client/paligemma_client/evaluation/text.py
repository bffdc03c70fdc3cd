"""Caption, VQA and OCR datasets (JSONL) and their scores: exact match and character error rate.

A dataset line: `{"image": "a.png", "question": "what color?", "answers": ["red", "Red"]}`. `image` is
relative to the JSONL file's folder (or absolute); `question` is required for VQA and ignored otherwise;
`answers` holds one or more accepted answers.

Exact match compares the answer with each accepted answer after `normalise`: caption and VQA strip
surrounding whitespace and lower-case; OCR compares the strings as they are (case, spacing and
punctuation are what reading text is about).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_TASKS = ("caption", "vqa", "ocr")
# What `normalise` does, in words, for the help and the report.
NORMALISATION = {"caption": "stripped and lower-cased", "vqa": "stripped and lower-cased",
                 "ocr": "compared as they are"}


class DatasetError(ValueError):
    """The dataset file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class TextExample:
    line: int  # 1-based line number in the JSONL file
    image: Path
    answers: tuple[str, ...]
    question: str | None = None


def normalise(task: str, text: str) -> str:
    """The text exact match compares: caption/VQA stripped and lower-cased, OCR untouched."""
    return text if task == "ocr" else text.strip().lower()


def exact_match(task: str, prediction: str, answers: Sequence[str]) -> bool:
    """Whether the prediction equals any accepted answer after `normalise`."""
    got = normalise(task, prediction)
    return any(got == normalise(task, answer) for answer in answers)


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete or substitute one character) that turn `a` into `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(prediction: str, reference: str) -> float:
    """Levenshtein distance / reference length. An empty reference has no characters to divide by: the
    rate is 0 when the prediction is empty too, else 1 (all of it is wrong)."""
    if not reference:
        return 0.0 if not prediction else 1.0
    return levenshtein(prediction, reference) / len(reference)


def best_character_error_rate(prediction: str, answers: Sequence[str]) -> float:
    """The rate against the closest accepted answer (the lowest rate among them)."""
    return min(character_error_rate(prediction, answer) for answer in answers)


def load_examples(path: Path, task: str) -> list[TextExample]:
    """Every line of a JSONL dataset, checked (blank lines skipped); DatasetError names a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read: {exc}") from exc
    examples = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"{path}, line {number}: not JSON ({exc})") from exc
        examples.append(_example(data, number, path, task))
    if not examples:
        raise DatasetError(f"{path}: no examples (one JSON object a line)")
    return examples


def _example(data: object, number: int, path: Path, task: str) -> TextExample:
    where = f"{path}, line {number}"
    if not isinstance(data, dict):
        raise DatasetError(f'{where}: not a JSON object like {{"image": "a.png", "answers": ["..."]}}')
    image, answers, question = data.get("image"), data.get("answers"), data.get("question")
    if not isinstance(image, str) or not image:
        raise DatasetError(f"{where}: `image` must be a path (relative to {path.parent}, or absolute)")
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(answer, str) for answer in answers)):
        raise DatasetError(f"{where}: `answers` must be a non-empty list of strings")
    if task == "vqa" and (not isinstance(question, str) or not question.strip()):
        raise DatasetError(f"{where}: `question` is required for vqa (a non-empty string)")
    return TextExample(number, path.parent / image, tuple(answers),
                       question if task == "vqa" and isinstance(question, str) else None)


@dataclass(frozen=True)
class TextScore:
    """One answered example, scored."""

    example: TextExample
    prediction: str
    exact: bool
    cer: float | None  # OCR only

    def record(self) -> dict[str, object]:
        """Its line in the saved predictions."""
        line: dict[str, object] = {"line": self.example.line, "image": str(self.example.image)}
        if self.example.question is not None:
            line["question"] = self.example.question
        line.update(answers=list(self.example.answers), prediction=self.prediction, exact_match=self.exact)
        if self.cer is not None:
            line["cer"] = self.cer
        return line


def score(task: str, example: TextExample, prediction: str) -> TextScore:
    cer = best_character_error_rate(prediction, example.answers) if task == "ocr" else None
    return TextScore(example, prediction, exact_match(task, prediction, example.answers), cer)


def summary(task: str, scores: Sequence[TextScore]) -> dict[str, float | None]:
    """The means over answered examples: `exact_match`, and `cer` for OCR (None when nothing was answered)."""
    count = len(scores)
    means: dict[str, float | None] = {"exact_match": sum(s.exact for s in scores) / count if count else None}
    if task == "ocr":
        means["cer"] = sum(s.cer or 0.0 for s in scores) / count if count else None
    return means
