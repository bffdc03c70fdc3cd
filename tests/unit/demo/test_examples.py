"""The mixture of tasks a scene's prompts are drawn from, as the training command line takes it."""

import numpy as np
import pytest

from app.demo.examples import TASK_WEIGHTS, examples, format_task_weights, parse_task_weights
from app.demo.world import COLORS, Scene, SceneObject, Word


def test_the_default_mixture_reads_back_as_itself():
    assert parse_task_weights(format_task_weights(TASK_WEIGHTS)) == TASK_WEIGHTS


@pytest.mark.parametrize(("text", "says"), [
    ("detect=1", "segment, caption, vqa, ocr missing"),
    ("detect=1,segment=1,caption=1,vqa=1,ocr=1,count=1", "'count=1' is not one of"),
    ("detect=1,detect=1,segment=1,caption=1,vqa=1,ocr=1", "given once"),
    ("detect,segment=1,caption=1,vqa=1,ocr=1", "'detect' is not one of"),
    ("detect=x,segment=1,caption=1,vqa=1,ocr=1", "'x' of detect is not a number"),
    ("detect=-1,segment=1,caption=1,vqa=1,ocr=1", "must be >= 0"),
    ("detect=nan,segment=1,caption=1,vqa=1,ocr=1", "must be >= 0"),
    ("detect=0,segment=0,caption=0,vqa=0,ocr=0", "at least one"),
])
def test_a_bad_mixture_says_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_task_weights(text)


def _scene(word: Word | None) -> Scene:
    return Scene((230, 230, 230), (SceneObject("circle", "red", COLORS["red"], 10, 100, 40),), word)


def test_prompts_are_drawn_in_the_mixtures_proportions():
    scene = _scene(None)
    weights = parse_task_weights("detect=0,segment=0,caption=1,vqa=3,ocr=0")
    drawn = [ex.task for ex in examples(scene, 4000, np.random.default_rng(0), codes=None, task_weights=weights)]
    assert set(drawn) == {"caption", "vqa"}
    assert drawn.count("vqa") / len(drawn) == pytest.approx(0.75, abs=0.03)


def test_ocr_weighs_less_on_a_scene_without_a_word_only():
    weights = parse_task_weights("detect=0,segment=0,caption=1,vqa=0,ocr=1")
    worded, blank = _scene(Word("FISH", 24, 120, 20, (120, 26, 170, 44))), _scene(None)

    def ocr_share(scene: Scene, wordless: float) -> float:
        drawn = [ex.task for ex in examples(scene, 4000, np.random.default_rng(0), codes=None,
                                            task_weights=weights, wordless_ocr=wordless)]
        return drawn.count("ocr") / len(drawn)

    assert ocr_share(blank, 0.25) == pytest.approx(0.2, abs=0.03)  # 0.25 against caption's 1
    assert ocr_share(worded, 0.25) == pytest.approx(0.5, abs=0.03)
    assert ocr_share(blank, 1.0) == ocr_share(worded, 1.0)  # 1: the mixture as it is, draw for draw
