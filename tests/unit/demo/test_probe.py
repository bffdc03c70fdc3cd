"""The vision probe's targets (app.demo.probe): what each image token is asked about its patch."""

import numpy as np
import pytest
import torch

from app.demo.probe import LETTERS, VisionProbe, add_capped_gradient, letter_inks, targets, word_ink
from app.demo.world import CANVAS, WORDS, generate_scene, object_mask, patch_sums, scene_rng, tight_box

GRID = 8
CELL = CANVAS // GRID
SCENES = [generate_scene(scene_rng(98, 0, i)) for i in range(40)]


def test_every_patch_an_object_covers_most_is_asked_for_that_objects_box():
    checked = 0
    for scene in SCENES:
        t = targets(scene, GRID)
        shares = np.stack([patch_sums(object_mask(obj).astype(np.float32), GRID) / CELL ** 2
                           for obj in scene.objects])
        for patch in range(GRID * GRID):
            if shares[:, patch].max() == 0:
                assert t.box_share[patch] == 0
                continue
            owner = scene.objects[int(shares[:, patch].argmax())]
            assert np.allclose(t.box[patch].numpy() * CANVAS, tight_box(owner), atol=1e-3)
            assert np.isclose(float(t.box_share[patch]), shares[:, patch].max())
            checked += 1
    assert checked > 100


def test_every_patch_the_words_ink_touches_is_asked_which_word_and_no_other():
    with_word = [s for s in SCENES if s.word is not None]
    assert with_word
    for scene in with_word:
        t = targets(scene, GRID)
        touched = patch_sums(word_ink(scene), GRID) > 0
        assert (t.word_class[touched] == WORDS.index(scene.word.text)).all()
        assert (t.word_class[~touched] == -100).all()
    for scene in (s for s in SCENES if s.word is None):
        assert (targets(scene, GRID).word_class == -100).all()


def _exact_tokens(batch, width=32):
    """Tokens whose first four values are the box targets, and a probe whose box head reads them."""
    tokens = torch.zeros(len(batch), GRID * GRID, width)
    tokens[..., :4] = torch.stack([t.box for t in batch])
    probe = VisionProbe(width, box_weight=1.0)
    with torch.no_grad():
        probe.box.weight.zero_()
        probe.box.weight[:, :4] = torch.eye(4)
        probe.box.bias.zero_()
    return tokens, probe


def test_the_box_term_is_zero_for_the_right_boxes_and_grows_with_the_error_on_covered_patches():
    batch = [targets(scene, GRID) for scene in SCENES[:4]]
    tokens, probe = _exact_tokens(batch)
    plain = VisionProbe(32)
    plain.load_state_dict({k: v for k, v in probe.state_dict().items() if not k.startswith("box")})
    assert torch.isclose(probe.loss(tokens, batch), plain.loss(tokens, batch))
    moved = tokens.clone()
    moved[..., 0] += 0.1  # every x_min off by a tenth of the canvas
    assert probe.loss(moved, batch) > plain.loss(moved, batch) + 0.5
    uncovered = torch.stack([t.box_share == 0 for t in batch])
    only_empty = tokens.clone()
    only_empty[..., 0] += 0.1 * uncovered  # errors where no object is are not counted
    assert torch.isclose(probe.loss(only_empty, batch), plain.loss(only_empty, batch))

    assert torch.isclose(probe.box_loss(moved, batch), probe.loss(moved, batch) - probe.loss(moved, batch, box=False))


def test_a_capped_gradient_joins_the_rest_at_most_at_its_share_and_unscaled_when_smaller():
    torch.manual_seed(0)
    rest = torch.randn(3, 8)
    for extra_size, share, expected_size in ((50.0, 0.5, 0.5), (0.1, 0.5, 0.1), (50.0, 2.0, 2.0)):
        extra = torch.randn(3, 8)
        extra = extra / extra.norm() * extra_size * rest.norm()
        tokens = torch.zeros(3, 8, requires_grad=True)
        ratios: list[float] = []
        add_capped_gradient(tokens, extra, share, ratios)
        (tokens * rest).sum().backward()  # the rest's gradient at the tokens is `rest`
        added = tokens.grad - rest
        assert torch.allclose(added / added.norm(), extra / extra.norm(), atol=1e-5)  # its direction kept
        assert np.isclose(float(added.norm() / rest.norm()), expected_size, rtol=1e-4)
        assert ratios == [pytest.approx(extra_size, rel=1e-4)]  # the ratio before the cap


def test_the_word_term_is_a_cross_entropy_over_the_words_on_touched_patches():
    scene = next(s for s in SCENES if s.word is not None)
    batch = [targets(scene, GRID)]
    tokens = torch.randn(1, GRID * GRID, 32)
    probe = VisionProbe(32, words=True)
    plain = VisionProbe(32)
    plain.load_state_dict({k: v for k, v in probe.state_dict().items() if not k.startswith("word_class")})
    touched = batch[0].word_class >= 0
    expected = torch.nn.functional.cross_entropy(probe.word_class(tokens[0, touched]),
                                                 batch[0].word_class[touched])
    assert torch.isclose(probe.loss(tokens, batch) - plain.loss(tokens, batch), expected, atol=1e-5)


def test_the_word_mean_term_asks_the_mean_of_each_words_tokens_which_word_it_is():
    with_word = [s for s in SCENES if s.word is not None][:2]
    without = next(s for s in SCENES if s.word is None)
    batch = [targets(s, GRID) for s in (with_word[0], without, with_word[1])]
    tokens = torch.randn(3, GRID * GRID, 32)
    probe = VisionProbe(32, word_mean=True)
    plain = VisionProbe(32)
    plain.load_state_dict({k: v for k, v in probe.state_dict().items() if not k.startswith("word_mean")})
    means = [tokens[i, batch[i].word_class >= 0].mean(0) for i in (0, 2)]
    labels = torch.tensor([WORDS.index(s.word.text) for s in with_word])
    expected = torch.nn.functional.cross_entropy(probe.word_mean(torch.stack(means)), labels)
    assert torch.isclose(probe.loss(tokens, batch) - plain.loss(tokens, batch), expected, atol=1e-5)
    # No word in the batch: the term adds nothing (and no NaN from an empty mean).
    assert torch.isclose(probe.loss(tokens[1:2], batch[1:2]), plain.loss(tokens[1:2], batch[1:2]), atol=1e-6)


def test_words_read_counts_the_words_the_word_mean_head_names_right():
    with_word = [s for s in SCENES if s.word is not None][:3]
    batch = [targets(s, GRID) for s in with_word]
    labels = [WORDS.index(s.word.text) for s in with_word]
    # Tokens that are one-hot in their word's index wherever the word's ink is: an identity head reads all.
    tokens = torch.zeros(3, GRID * GRID, len(WORDS))
    for i, t in enumerate(batch):
        tokens[i, t.word_class >= 0, labels[i]] = 1.0
    probe = VisionProbe(len(WORDS), word_mean=True)
    with torch.no_grad():
        probe.word_mean.weight.copy_(torch.eye(len(WORDS)))
        probe.word_mean.bias.zero_()
    assert probe.words_read(tokens, batch) == (3, 3)
    tokens[1] = tokens[1].roll(1, dims=-1)  # the second word's tokens now say the next word
    assert probe.words_read(tokens, batch) == (2, 3)
    without = next(s for s in SCENES if s.word is None)
    assert probe.words_read(tokens[:1], [targets(without, GRID)]) == (0, 0)
    assert VisionProbe(len(WORDS)).words_read(tokens, batch) == (0, 0)  # no head, nothing read


def test_letter_inks_split_the_words_ink_left_to_right_and_name_each_patchs_main_letter():
    with_word = [s for s in SCENES if s.word is not None]
    centre = (np.arange(GRID) * CELL + CELL / 2)[None, :].repeat(GRID, 0).reshape(-1)  # patch x centres
    for scene in with_word:
        inks = letter_inks(scene, GRID)
        assert inks.shape == (len(scene.word.text), GRID * GRID)
        whole = patch_sums(word_ink(scene), GRID)
        assert np.allclose(inks.sum(0), whole, rtol=0.05, atol=2.0)  # overlaps of anti-aliased edges only
        xs = (inks * centre).sum(1) / inks.sum(1)
        assert (np.diff(xs) > -1e-3).all()  # each letter's ink lies at or right of the one before
        t = targets(scene, GRID)
        for patch in np.nonzero(whole > 0)[0]:
            main = scene.word.text[int(inks[:, patch].argmax())]
            assert int(t.letter_class[patch]) == LETTERS.index(main)
        assert (t.letter_class[whole == 0] == -100).all()
