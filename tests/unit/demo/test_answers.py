"""What the demo model answers about a scene, and the loc bins by the server's own convention."""

from app.demo import answers
from app.demo.world import CANVAS, COLORS, Scene, SceneObject, Word, tight_box
from app.tasks.parsing import parse_objects


def obj(color: str, shape: str, x: int, y: int, size: int = 40) -> SceneObject:
    return SceneObject(shape, color, COLORS[color], x, y, size)


RED_CIRCLE = obj("red", "circle", 10, 100)
BLUE_SQUARE = obj("blue", "square", 120, 20, 60)
GREEN_TRIANGLE = obj("green", "triangle", 60, 10)
BLUE_CIRCLE = obj("blue", "circle", 170, 160)
WORD = Word("TREE", 24, 150, 100, (150, 108, 200, 124))


def scene(*objects: SceneObject, word: Word | None = None) -> Scene:
    return Scene((230, 230, 230), objects, word)


def test_captions_list_objects_left_to_right_by_box_centre():
    assert answers.caption(scene(BLUE_SQUARE)) == "a blue square"
    assert answers.caption(scene(BLUE_SQUARE, RED_CIRCLE)) == "a red circle and a blue square"
    assert (answers.caption(scene(BLUE_SQUARE, RED_CIRCLE, GREEN_TRIANGLE))
            == "a red circle, a green triangle and a blue square")
    # A wide object starting further left can still have its centre further right.
    wide = obj("yellow", "square", 0, 150, 100)  # centre x 50.5
    narrow = obj("red", "triangle", 30, 10, 40)  # centre x 50.5 too: the upper one first
    assert answers.caption(scene(wide, narrow)) == "a red triangle and a yellow square"
    assert answers.caption(scene(RED_CIRCLE, word=WORD)) == "a red circle"  # the word is not mentioned


def test_vqa_answers():
    two_circles = scene(RED_CIRCLE, BLUE_CIRCLE, BLUE_SQUARE)
    assert answers.count_answer(two_circles) == "3"
    assert answers.color_answer(two_circles, "square") == "blue"
    assert answers.color_answer(two_circles, "circle") is None  # two circles: not asked
    assert answers.color_answer(two_circles, "triangle") is None  # none: not asked
    assert answers.presence_answer(two_circles, "blue", "circle") == "yes"
    assert answers.presence_answer(two_circles, "green", "circle") == "no"
    assert answers.vqa_prompt(answers.HOW_MANY) == "answer en how many shapes are there?"
    assert answers.color_question("circle") == "what color is the circle?"
    assert answers.presence_question("red", "square") == "is there a red square?"


def test_ocr_answers_the_word_or_nothing():
    assert answers.ocr_answer(scene(RED_CIRCLE, word=WORD)) == "TREE"
    assert answers.ocr_answer(scene(RED_CIRCLE)) == ""
    assert answers.ocr_prompt() == "ocr"


def test_detect_targets_parse_back_to_the_tight_boxes():
    s = scene(BLUE_CIRCLE, RED_CIRCLE, BLUE_SQUARE)
    assert answers.detect_prompt(["blue circle"]) == "detect blue circle"
    [found] = parse_objects(answers.detect_answer(s, ["blue circle"])).objects
    assert found.label == "blue circle"
    pixels = found.box.to_pixels(CANVAS, CANVAS)
    for got, want in zip((pixels.x_min, pixels.y_min, pixels.x_max, pixels.y_max), tight_box(BLUE_CIRCLE),
                         strict=True):
        assert abs(got - want) <= CANVAS / 1023 / 2 + 1e-9  # half a bin: the rounding of round(v * 1023)


def test_a_shape_query_finds_every_object_of_that_shape_left_to_right_and_absent_ones_nothing():
    s = scene(BLUE_CIRCLE, RED_CIRCLE, BLUE_SQUARE)
    text = answers.detect_answer(s, ["circle"])
    parsed = parse_objects(text).objects
    assert [o.label for o in parsed] == ["circle", "circle"]
    assert parsed[0].box.x_min < parsed[1].box.x_min
    assert " ; " in text
    assert answers.detect_answer(s, ["green triangle"]) == ""
    several = parse_objects(answers.detect_answer(s, ["blue square", "green triangle", "red circle"])).objects
    assert [o.label for o in several] == ["blue square", "red circle"]


def test_segment_targets_carry_sixteen_mask_tokens_after_the_box():
    codes = tuple(range(100, 116))
    text = answers.segment_answer(scene(RED_CIRCLE), ["red circle"], lambda _: codes)
    assert answers.segment_prompt(["red circle"]) == "segment red circle"
    [found] = parse_objects(text).objects
    assert found.mask_tokens == codes and found.mask_problem is None and found.label == "red circle"
    assert text == answers.box_tokens(RED_CIRCLE) + "".join(f"<seg{c:03d}>" for c in codes) + " red circle"
