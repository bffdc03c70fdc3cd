"""Training examples: which prompts a scene is trained on, drawn at random over every task.

Each scene is trained on several prompts at once (its image is encoded once for all of them), drawn from
a mixture weighted towards what is hardest to learn (the boxes of detect and segment). Detect and segment
queries are one present `{color} {shape}` or all of the scene's objects in one prompt (as a COCO
evaluation asks: `detect red circle ; blue square`), and also a bare `{shape}` and objects that are not
there (the answer leaves them out, or is empty), so that any way a client asks has been seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.demo import answers
from app.demo.answers import MaskCodes
from app.demo.world import COLORS, SHAPES, Scene, SceneObject

KINDS = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)

# Relative weights of the tasks among a scene's prompts. With the box target (app.demo.probe) the boxes
# come with less detect than without it, and VQA asks for more: at detect 0.4 / VQA 0.13 its "is there a
# {color} {shape}?" was right 0.69 of the time on held-out scenes (docs/demo.md, "The mixture"). Reading
# rises with OCR's share (55, 64 and 74-76 of 96 held-out words at 0.1, 0.15 and 0.2) while the boxes
# hold (docs/demo.md, "OCR at 0.2, three seeds"), and stops there: 0.22 and 0.25 read fewer of four
# held-out sets' 415 words (295, 292 against 306; "More OCR (0.22, 0.25)"). OCR 0.3, most of it on the
# scenes with a word, fell into never learning colour ("Reading more, tried").
TASK_WEIGHTS = {"detect": 0.27, "segment": 0.16, "caption": 0.14, "vqa": 0.23, "ocr": 0.2}


@dataclass(frozen=True)
class Example:
    task: str
    prefix: str
    target: str
    # detect / segment: whose boxes the target gives, in its order; VQA: the object asked about, if any
    objects: tuple[SceneObject, ...] = ()


def _queries(scene: Scene, rng: np.random.Generator) -> list[str]:
    present = [obj.name for obj in scene.objects]
    absent = [kind for kind in KINDS if kind not in present]
    roll = rng.random()
    if roll < 0.45:  # one object that is there
        return [present[int(rng.integers(len(present)))]]
    if roll < 0.8:  # every object there, in some order (how a COCO evaluation asks)
        return [str(q) for q in rng.permutation(present)]
    if roll < 0.9:  # every object of a shape
        return [str(rng.choice(SHAPES))]
    if roll < 0.95:  # one that is not there
        return [absent[int(rng.integers(len(absent)))]]
    # Some that are there and one that is not.
    chosen = [str(q) for q in rng.permutation(present)][: int(rng.integers(1, len(present) + 1))]
    chosen.insert(int(rng.integers(len(chosen) + 1)), absent[int(rng.integers(len(absent)))])
    return chosen


def _vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, str, tuple[SceneObject, ...]]:
    """(question, answer, the object the question is about where there is one)."""
    roll = rng.random()
    if roll < 0.3:
        return answers.HOW_MANY, answers.count_answer(scene), ()
    if roll < 0.6:
        shapes = [s for s in SHAPES if answers.color_answer(scene, s) is not None]
        shape = str(rng.choice(shapes)) if shapes else None
        if shape is not None:
            about = tuple(obj for obj in scene.objects if obj.shape == shape)
            return answers.color_question(shape), str(answers.color_answer(scene, shape)), about
    # Presence, half yes and half no.
    if rng.random() < 0.5:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        color, shape = obj.color, obj.shape
    else:
        present = {obj.name for obj in scene.objects}
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        while f"{color} {shape}" in present:
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    about = tuple(obj for obj in scene.objects if obj.color == color and obj.shape == shape)
    return answers.presence_question(color, shape), answers.presence_answer(scene, color, shape), about[:1]


def _answered(scene: Scene, queries: list[str]) -> tuple[SceneObject, ...]:
    """The objects of a detect / segment answer, in the order `answers.detect_answer` writes them."""
    return tuple(obj for query in queries for obj in answers.matches(scene, query))


def example(scene: Scene, task: str, rng: np.random.Generator, codes: MaskCodes) -> Example:
    if task == "detect":
        queries = _queries(scene, rng)
        return Example(task, answers.detect_prompt(queries), answers.detect_answer(scene, queries),
                       _answered(scene, queries))
    if task == "segment":
        queries = _queries(scene, rng)
        return Example(task, answers.segment_prompt(queries), answers.segment_answer(scene, queries, codes),
                       _answered(scene, queries))
    if task == "caption":
        return Example(task, answers.caption_prompt(), answers.caption(scene))
    if task == "vqa":
        question, answer, about = _vqa(scene, rng)
        return Example(task, answers.vqa_prompt(question), answer, about)
    return Example("ocr", answers.ocr_prompt(), answers.ocr_answer(scene))


def format_task_weights(weights: dict[str, float]) -> str:
    """`detect=0.4,segment=0.24,...`: a mixture as the training command line takes it."""
    return ",".join(f"{task}={weight:g}" for task, weight in weights.items())


def parse_task_weights(text: str) -> dict[str, float]:
    """A mixture from `task=weight,...`: every task once, none negative, not all zero."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        task, sep, value = part.partition("=")
        task = task.strip()
        if not sep or task not in TASK_WEIGHTS or task in weights:
            raise ValueError(f"task weights: {part.strip()!r} is not one of {', '.join(TASK_WEIGHTS)} "
                             f"given once as task=weight")
        try:
            weights[task] = float(value)
        except ValueError:
            raise ValueError(f"task weights: {value.strip()!r} of {task} is not a number") from None
        if not weights[task] >= 0:  # NaN too
            raise ValueError(f"task weights: {task}'s weight must be >= 0, not {value.strip()}")
    if missing := [t for t in TASK_WEIGHTS if t not in weights]:
        raise ValueError(f"task weights: {', '.join(missing)} missing (give 0 to leave a task out)")
    if not sum(weights.values()) > 0:
        raise ValueError("task weights: at least one must be above 0")
    return weights


def examples(scene: Scene, count: int, rng: np.random.Generator, codes: MaskCodes,
             task_weights: dict[str, float] | None = None, wordless_ocr: float = 1.0) -> list[Example]:
    """`count` prompts for `scene`, drawn from the mixture; on a scene without a word OCR's weight is
    `wordless_ocr` times the mixture's (its answer there, empty, is learnt long before any word is read)."""
    mixture = dict(TASK_WEIGHTS if task_weights is None else task_weights)
    if scene.word is None:
        mixture["ocr"] *= wordless_ocr
    tasks = list(mixture)
    weights = np.array([mixture[t] for t in tasks])
    picked = rng.choice(len(tasks), size=count, p=weights / weights.sum())
    return [example(scene, tasks[int(i)], rng, codes) for i in picked]
