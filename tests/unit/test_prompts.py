import pytest

from app.errors import InvalidRequest
from app.tasks import prompts
from app.tasks.prompts import PromptLimits

LIMITS = PromptLimits(max_objects=3, max_text_chars=20)


def test_caption_and_describe_prefixes():
    assert prompts.caption_prompt("en", long=False) == "caption en"
    assert prompts.caption_prompt("es", long=True) == "describe es"
    assert prompts.caption_prompt(" pt-BR ", long=False) == "caption pt-BR"


@pytest.mark.parametrize("bad", ["", "english", "e", "en_US", "en us", "EN", "12", "en-", "zh-Hant-TW"])
def test_language_codes_are_checked(bad):
    with pytest.raises(InvalidRequest) as err:
        prompts.caption_prompt(bad, long=False)
    assert err.value.param == "language"


def test_vqa_prefix_collapses_whitespace_so_a_newline_cannot_end_the_prefix():
    assert prompts.vqa_prompt("what is\nthis?  ", "fr", LIMITS) == "answer fr what is this?"


def test_vqa_question_bounds():
    with pytest.raises(InvalidRequest, match="must not be empty"):
        prompts.vqa_prompt("   \n", "en", LIMITS)
    with pytest.raises(InvalidRequest, match=r"at most 20 characters\. Given: 21"):
        prompts.vqa_prompt("x" * 21, "en", LIMITS)
    with pytest.raises(InvalidRequest, match="control characters"):
        prompts.vqa_prompt("a\x00b", "en", LIMITS)
    with pytest.raises(InvalidRequest, match="UTF-8"):
        prompts.vqa_prompt("a\ufffdb", "en", LIMITS)


def test_objects_from_repeated_fields_and_semicolons():
    assert prompts.detect_prompt(["cat", "dog ; red car"], LIMITS) == "detect cat ; dog ; red car"
    assert prompts.segment_prompt(["  the big   one  "], LIMITS) == "segment the big one"
    assert prompts.detect_prompt(["cat ;; ; dog"], LIMITS) == "detect cat ; dog"


def test_object_bounds():
    with pytest.raises(InvalidRequest, match="at least one object"):
        prompts.detect_prompt([" ; ", ""], LIMITS)
    with pytest.raises(InvalidRequest, match=r"at most 3 objects\. Given: 4"):
        prompts.detect_prompt(["a;b;c;d"], LIMITS)
    with pytest.raises(InvalidRequest, match="at most 20 characters"):
        prompts.segment_prompt(["y" * 25], LIMITS)


def test_ocr_and_raw_prompt():
    assert prompts.ocr_prompt() == "ocr"
    assert prompts.raw_prompt(" caption   es ", LIMITS) == "caption es"
