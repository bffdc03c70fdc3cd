"""The in-process evaluation's answers, on the shipped demo checkpoint: its first-token figures (the end of
the answer against every `<loc>` token) agree with what greedy decoding answered."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from app.demo import WEIGHTS_DIR, answers
from app.demo.evaluate import Answerer
from app.demo.examples import KINDS
from app.demo.scenes import SHIPPED, STATIC_SCENES


def test_first_token_figures_agree_with_the_greedy_answer():
    model = PaliGemmaForConditionalGeneration.from_pretrained(WEIGHTS_DIR, dtype=torch.float32).eval()
    answerer = Answerer(model, PaliGemmaProcessor.from_pretrained(WEIGHTS_DIR))
    pairs = []
    for shipped in SHIPPED[:2]:
        image = Image.open(STATIC_SCENES / shipped.file_name).convert("RGB")
        present = {obj.name for obj in shipped.scene().objects}
        absent = [kind for kind in KINDS if kind not in present][:3]
        pairs += [(image, answers.detect_prompt([kind])) for kind in [*sorted(present), *absent]]
    answered = answerer.answers(pairs)
    assert [a.text for a in answered] == answerer(pairs)
    boxes = [a for a in answered if a.text.startswith("<loc")]
    empty = [a for a in answered if not a.text]
    assert boxes and empty  # objects there and not there: both kinds of first step are under test
    for a in answered:
        assert 0.0 <= a.first_end <= 1.0 and 0.0 <= a.first_loc <= 1.0 and a.first_end + a.first_loc <= 1.0001
    # Greedy started a box: one bin beat the end, so all of them together did.
    assert all(a.first_loc > a.first_end for a in boxes)
    # Greedy ended at once: the end beat every bin, so at least their mean.
    assert all(a.first_end >= a.first_loc / 1024 for a in empty)
