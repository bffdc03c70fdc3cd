"""`paligemma eval caption|vqa|ocr`'s scoring: normalisation, exact match, character error rate, and the
JSONL dataset format."""

from __future__ import annotations

import json

import pytest
from paligemma_client.evaluation.text import (
    DatasetError,
    best_character_error_rate,
    character_error_rate,
    exact_match,
    levenshtein,
    load_examples,
    normalise,
    score,
    summary,
)


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("STOP", "stop", 4), ("ab", "ba", 2), ("red box", "red box", 0), ("été", "ete", 2),
])
def test_levenshtein_counts_single_character_edits(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_character_error_rate_is_distance_over_reference_length():
    assert character_error_rate("STOP", "STOP") == 0.0
    assert character_error_rate("ST0P", "STOP") == 0.25
    assert character_error_rate("STOPS", "STOP") == 0.25  # an insertion
    assert character_error_rate("", "STOP") == 1.0  # nothing read
    assert character_error_rate("NO PARKING", "NO") == 4.0  # insertions can take it above 1


def test_an_empty_reference_scores_0_for_no_text_and_1_for_any_text():
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("x", "") == 1.0
    assert character_error_rate("a long hallucination", "") == 1.0


def test_the_rate_is_taken_against_the_closest_answer():
    assert best_character_error_rate("SALE", ["SALE 50%", "SALE"]) == 0.0
    assert best_character_error_rate("SALF", ["SALE", "SOLD"]) == 0.25
    assert best_character_error_rate("X", ["", "XY"]) == 0.5  # 1/2 beats the empty answer's 1


def test_caption_and_vqa_compare_stripped_and_lower_cased():
    for task in ("caption", "vqa"):
        assert normalise(task, "  A Red Box\n") == "a red box"
        assert exact_match(task, " A red BOX ", ["a blue box", "a red box"])
        assert not exact_match(task, "a red  box", ["a red box"])  # inner spacing is kept
        assert not exact_match(task, "a red box.", ["a red box"])


def test_ocr_compares_the_strings_as_they_are():
    assert normalise("ocr", " Stop ") == " Stop "
    assert exact_match("ocr", "STOP", ["STOP"])
    assert not exact_match("ocr", "stop", ["STOP"])
    assert not exact_match("ocr", "STOP ", ["STOP"])


def test_the_summary_is_the_mean_over_answered_examples(tmp_path):
    path = tmp_path / "ocr.jsonl"
    path.write_text(json.dumps({"image": "a.png", "answers": ["STOP"]}) + "\n"
                    + json.dumps({"image": "b.png", "answers": ["EXIT", "EX1T"]}) + "\n")
    first, second = load_examples(path, "ocr")
    scores = [score("ocr", first, "STOP"), score("ocr", second, "EXT")]
    assert [s.exact for s in scores] == [True, False]
    assert [s.cer for s in scores] == [0.0, 0.25]
    assert summary("ocr", scores) == {"exact_match": 0.5, "cer": 0.125}
    assert summary("vqa", []) == {"exact_match": None}
    assert scores[1].record() == {"line": 2, "image": str(tmp_path / "b.png"), "answers": ["EXIT", "EX1T"],
                                  "prediction": "EXT", "exact_match": False, "cer": 0.25}


def test_images_are_relative_to_the_jsonl_folder_or_absolute(tmp_path):
    path = tmp_path / "sets" / "vqa.jsonl"
    path.parent.mkdir()
    lines = [{"image": "img/a.png", "question": "what color?", "answers": ["red"]},
             {"image": str(tmp_path / "b.png"), "question": "how many?", "answers": ["2", "two"]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a blank line is skipped
    first, second = load_examples(path, "vqa")
    assert (first.image, first.question, first.answers, first.line) == (
        tmp_path / "sets" / "img" / "a.png", "what color?", ("red",), 1)
    assert (second.image, second.answers) == (tmp_path / "b.png", ("2", "two"))
    [caption, _] = load_examples(path, "caption")
    assert caption.question is None  # caption and OCR ignore a question


@pytest.mark.parametrize(("task", "line", "message"), [
    ("vqa", {"image": "a.png", "answers": ["red"]}, "line 2: `question` is required for vqa"),
    ("vqa", {"image": "a.png", "question": " ", "answers": ["red"]}, "`question` is required"),
    ("caption", {"image": "a.png", "answers": []}, "line 2: `answers` must be a non-empty list of strings"),
    ("caption", {"image": "a.png", "answers": "red"}, "`answers` must be a non-empty list"),
    ("ocr", {"answers": ["x"]}, "line 2: `image` must be a path"),
    ("ocr", ["a.png", "x"], "line 2: not a JSON object"),
])
def test_a_bad_line_is_named(tmp_path, task, line, message):
    path = tmp_path / "data.jsonl"
    good = {"image": "ok.png", "question": "q?", "answers": ["x"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_examples(path, task)


def test_unreadable_and_empty_files_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="cannot be read"):
        load_examples(tmp_path / "missing.jsonl", "ocr")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png",\n')
    with pytest.raises(DatasetError, match="line 1: not JSON"):
        load_examples(tmp_path / "bad.jsonl", "ocr")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_examples(tmp_path / "empty.jsonl", "ocr")
