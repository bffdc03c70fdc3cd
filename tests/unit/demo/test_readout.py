"""The linear readout of app.demo.readout: exact on tokens that hold the answers, chance on noise."""

import numpy as np
import pytest

from app.demo.probe import LETTERS, PATCH_CLASSES, targets
from app.demo.readout import readouts
from app.demo.world import WORDS, generate_scene, scene_rng

GRID = 8
SCENES = [generate_scene(scene_rng(97, 0, i)) for i in range(160)]


def _answering(scene):
    """Tokens that hold the probe's own targets: the box of the object owning the patch, the patch's
    class (its kind, for an object), the word's and the patch's main letter's one-hots."""
    t = targets(scene, GRID)
    classes = np.eye(PATCH_CLASSES)[t.classes.numpy()]
    words = np.zeros((GRID * GRID, len(WORDS)))
    letters = np.zeros((GRID * GRID, len(LETTERS)))
    inked = t.word_class.numpy() >= 0
    words[inked, t.word_class.numpy()[inked]] = 1
    letters[inked, t.letter_class.numpy()[inked]] = 1
    return np.c_[t.box.numpy() * (t.box_share.numpy()[:, None] > 0), classes, words, letters]


def test_tokens_that_hold_the_answers_read_out_almost_exactly():
    numbers = readouts(_answering, SCENES, GRID)
    assert numbers["box_edge_error_px"] < 0.1 * numbers["box_edge_error_px_chance"]
    assert numbers["kind_accuracy"] > 0.95
    assert numbers["presence_accuracy"] > 0.95
    assert numbers["word_accuracy"] > 0.95
    assert numbers["letter_accuracy"] > 0.95


def test_noise_reads_out_at_chance():
    rng = np.random.default_rng(0)
    numbers = readouts(lambda scene: rng.normal(size=(GRID * GRID, 16)), SCENES, GRID)
    assert numbers["box_edge_error_px"] == pytest.approx(numbers["box_edge_error_px_chance"], rel=0.2)
    assert numbers["kind_accuracy"] < numbers["kind_accuracy_chance"] + 0.15
    assert numbers["presence_accuracy"] < numbers["presence_accuracy_chance"] + 0.05
    assert numbers["word_accuracy"] < 0.3
    assert numbers["letter_accuracy"] < numbers["letter_accuracy_chance"] + 0.15
