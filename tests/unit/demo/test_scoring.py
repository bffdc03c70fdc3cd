"""The demo's scores (app.demo.scoring): box and mask IoU, and where boxes miss, by axis."""

import numpy as np
import pytest

from app.demo.scoring import Tally, box_iou, caption_mistake, detect_outcome, edge_errors, mask_iou


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_mask_iou_counts_no_answer_as_zero():
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2] = True
    assert mask_iou(truth, None) == 0.0
    assert mask_iou(truth, truth) == 1.0
    half = np.zeros_like(truth)
    half[0] = True
    assert mask_iou(truth, half) == 0.5


def test_edge_errors_tell_the_axes_apart_and_scale_to_the_canvas():
    truth = (10.0, 20.0, 50.0, 60.0)
    assert edge_errors(truth, (14.0, 20.0, 58.0, 61.0)) == (6.0, 0.5)
    # The same miss on an image drawn at half the size is twice as many canvas pixels.
    assert edge_errors((5.0, 10.0, 25.0, 30.0), (7.0, 10.0, 29.0, 30.5), 2.0, 2.0) == (6.0, 0.5)
    assert edge_errors(truth, (10.0, 23.0, 50.0, 63.0), 2.0, 0.5) == (0.0, 1.5)


def test_the_summary_gives_the_median_error_of_each_axis():
    tally = Tally(detect_ious=[0.9, 0.4, 0.0], edge_errors=[(1.0, 10.0), (3.0, 20.0), (100.0, 30.0)])
    summary = tally.summary()
    assert summary["detect_found"] == pytest.approx(1 / 3, abs=1e-4)
    assert summary["detect_x_error_px"] == 3.0 and summary["detect_y_error_px"] == 20.0
    assert "detect_x_error_px" not in Tally(detect_ious=[0.0]).summary()  # no box came back


def test_a_missed_object_is_told_apart_by_how_it_was_missed():
    truth, other = (10.0, 10.0, 50.0, 50.0), (100.0, 10.0, 140.0, 50.0)
    assert detect_outcome(truth, [other], [(11.0, 10.0, 50.0, 51.0)]) == "found"
    assert detect_outcome(truth, [other], []) == "empty"
    assert detect_outcome(truth, [other], [(101.0, 10.0, 140.0, 50.0)]) == "other_object"
    assert detect_outcome(truth, [other], [(10.0, 10.0, 30.0, 30.0)]) == "loose"  # a quarter of it
    # The right box among several answers counts as found, whatever else came back.
    assert detect_outcome(truth, [other], [(101.0, 10.0, 140.0, 50.0), (10.0, 10.0, 50.0, 50.0)]) == "found"


def test_a_caption_with_the_right_objects_in_another_order_is_counted_apart():
    expected = "a red circle, a blue square and a green triangle"
    assert caption_mistake(expected, expected) == "right"
    assert caption_mistake("a blue square, a red circle and a green triangle", expected) == "order"
    assert caption_mistake("a red circle and a blue square", expected) == "objects"
    assert caption_mistake("a red circle, a blue circle and a green triangle", expected) == "objects"
    tally = Tally()
    tally.caption_mistakes.update(["right", "order", "order", "objects"])
    tally.detect_outcomes.update(["found", "found", "empty", "loose"])
    summary = tally.summary()
    assert summary["caption_wrong_order"] == 0.5
    assert (summary["detect_missed_empty"], summary["detect_missed_loose"]) == (0.25, 0.25)
    assert summary["detect_missed_other_object"] == 0.0


def test_the_summary_tells_how_empty_answers_began():
    # (P(end), P(any loc)) of the first token of each detect answer left empty
    tally = Tally(empty_first_steps=[(0.1, 0.85), (0.6, 0.3), (0.05, 0.9)])
    summary = tally.summary()
    assert summary["detect_empty_median_end"] == 0.1 and summary["detect_empty_median_loc"] == 0.85
    assert summary["detect_empty_loc_above_end"] == round(2 / 3, 4)
    assert "detect_empty_median_end" not in Tally(detect_ious=[0.9]).summary()
