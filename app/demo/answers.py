"""What the demo model answers about a scene: every prompt and its target text. Pure functions.

Prompts are built by the server's own builders (`app.tasks.prompts`) and boxes written by the server's
own loc-bin convention (`app.tasks.parsing.encode_box`), so training targets and served answers cannot
drift apart. docs/demo.md lists the answers with examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.demo.world import CANVAS, Scene, SceneObject, tight_box
from app.tasks import prompts
from app.tasks.parsing import Box, encode_box

LANGUAGE = "en"
HOW_MANY = "how many shapes are there?"
_LIMITS = prompts.PromptLimits()

# An object's 16 mask tokens (codebook indices) under the demo's mask VQ-VAE.
MaskCodes = Callable[[SceneObject], Sequence[int]]


def _centre(obj: SceneObject) -> tuple[float, float]:
    x0, y0, x1, y1 = tight_box(obj)
    return ((x0 + x1) / 2, (y0 + y1) / 2)


def left_to_right(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """Objects by the x of their box centre (then y, for the rare object right below another)."""
    return sorted(objects, key=_centre)


def caption(scene: Scene) -> str:
    """`a red circle`, `a red circle and a blue square`,
    `a red circle, a blue square and a green triangle`."""
    names = [f"a {obj.name}" for obj in left_to_right(scene.objects)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def color_question(shape: str) -> str:
    return f"what color is the {shape}?"


def presence_question(color: str, shape: str) -> str:
    return f"is there a {color} {shape}?"


def count_answer(scene: Scene) -> str:
    return str(len(scene.objects))


def color_answer(scene: Scene, shape: str) -> str | None:
    """The colour of the one object of this shape; None when the question is not asked (0 or 2+ of them)."""
    found = [obj for obj in scene.objects if obj.shape == shape]
    return found[0].color if len(found) == 1 else None


def presence_answer(scene: Scene, color: str, shape: str) -> str:
    return "yes" if any(obj.color == color and obj.shape == shape for obj in scene.objects) else "no"


def ocr_answer(scene: Scene) -> str:
    return scene.word.text if scene.word is not None else ""


def matches(scene: Scene, query: str) -> list[SceneObject]:
    """The objects a detect/segment query names: `red circle` one object (or none), `circle` every
    circle, left to right."""
    return left_to_right([obj for obj in scene.objects if query in (obj.name, obj.shape)])


def box_tokens(obj: SceneObject) -> str:
    """The object's tight box as four loc tokens, by the server's convention."""
    x0, y0, x1, y1 = tight_box(obj)
    return encode_box(Box(x0 / CANVAS, y0 / CANVAS, x1 / CANVAS, y1 / CANVAS))


def detect_answer(scene: Scene, queries: Sequence[str]) -> str:
    """`<loc>x4 label` for every object each query names, in query order, joined by ` ; `."""
    return " ; ".join(f"{box_tokens(obj)} {query}" for query in queries for obj in matches(scene, query))


def segment_answer(scene: Scene, queries: Sequence[str], codes: MaskCodes) -> str:
    """As `detect_answer`, with the object's 16 `<segNNN>` tokens after its box."""
    def one(obj: SceneObject, query: str) -> str:
        return box_tokens(obj) + "".join(f"<seg{c:03d}>" for c in codes(obj)) + f" {query}"

    return " ; ".join(one(obj, query) for query in queries for obj in matches(scene, query))


# The prompt text of each task, by the server's builders.
def caption_prompt() -> str:
    return prompts.caption_prompt(LANGUAGE, long=False)


def vqa_prompt(question: str) -> str:
    return prompts.vqa_prompt(question, LANGUAGE, _LIMITS)


def ocr_prompt() -> str:
    return prompts.ocr_prompt()


def detect_prompt(queries: Sequence[str]) -> str:
    return prompts.detect_prompt(list(queries), _LIMITS)


def segment_prompt(queries: Sequence[str]) -> str:
    return prompts.segment_prompt(list(queries), _LIMITS)
