"""The training-only attention target (app.demo.pointing): its positions are the ones that write an
object's box and mask (or read the word), its targets are where that object is, and its loss is the
cross-entropy of the real attention of the layer it hooks, as the model computes it."""

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from app.demo.batches import BatchMaker
from app.demo.examples import Example, example
from app.demo.mask_vqvae import MaskTokenizer, save_npz, train_mask_vqvae
from app.demo.pointing import AttentionPointer, patch_shares
from app.demo.probe import word_ink
from app.demo.train import TrainConfig, batch_logits, build, train_model
from app.demo.world import CANVAS, Scene, SceneObject, Word, object_mask
from app.model import presets
from app.model.inputs import ImageTransform, PromptEncoder


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return MaskTokenizer(save_npz(train_mask_vqvae(seed=0, steps=5, batch_size=4),
                                 tmp_path_factory.mktemp("vqvae") / "vae-demo.npz"))


@pytest.fixture(scope="module")
def built():
    return build("demo", seed=0)


def _maker(processor, codes, images=2, prompts=6):
    return BatchMaker(PromptEncoder.from_processor(processor), ImageTransform.from_processor(processor), codes,
                      seed=3, images=images, prompts=prompts)


def test_patch_shares_are_where_the_pixels_are():
    mask = np.zeros((CANVAS, CANVAS), dtype=bool)
    mask[0:28, 0:14] = True  # half of the first patch's columns ...
    mask[196:224, 210:224] = True  # ... and half of the last one's
    shares = patch_shares(mask, 8)
    assert shares.shape == (64,) and shares.sum() == pytest.approx(1.0)
    assert shares[0] == pytest.approx(0.5) and shares[63] == pytest.approx(0.5)
    assert patch_shares(np.zeros((CANVAS, CANVAS), dtype=bool), 8).sum() == 0


def test_every_loc_and_seg_token_points_at_its_own_object(built, codes):
    _, processor = built
    maker = _maker(processor, codes)
    left = SceneObject("circle", "red", (220, 30, 30), 10, 10, 50)
    right = SceneObject("square", "blue", (30, 30, 220), 150, 140, 60)
    scene = Scene((250, 250, 250), (left, right), None)
    example = Example("segment", "segment red circle ; blue square",
                      "<loc0001><loc0002><loc0003><loc0004>" + "<seg001>" * 16 + " red circle ; "
                      "<loc0005><loc0006><loc0007><loc0008>" + "<seg002>" * 16 + " blue square",
                      (left, right))
    rows = maker.collate(torch.zeros((1, 3, 224, 224)), [(0, example, maker.regions(scene, example))]).groups[0]
    target = maker.target_ids(example.target)
    prompt_length = int((rows.token_type_ids[0] == 0).sum())
    tokens = [target[p - prompt_length + 1] for p in rows.point_positions.tolist()]
    special = set(processor.tokenizer.convert_tokens_to_ids([*presets.LOC_TOKENS, *presets.SEG_TOKENS]))
    assert len(tokens) == 2 * (4 + 16) and set(tokens) <= special  # every box and mask token, nothing else
    first, second = rows.point_targets[:20], rows.point_targets[20:]
    assert torch.equal(first, torch.from_numpy(patch_shares(object_mask(left), 8)).expand(20, -1))
    assert torch.equal(second, torch.from_numpy(patch_shares(object_mask(right), 8)).expand(20, -1))
    # The first loc token is predicted by the prompt's last position.
    assert rows.point_positions[0] == prompt_length - 1


def test_ocr_points_at_the_word_and_other_answers_nowhere(built, codes):
    _, processor = built
    maker = _maker(processor, codes)
    shape = SceneObject("circle", "red", (220, 30, 30), 10, 10, 50)
    scene = Scene((250, 250, 250), (shape,), Word("CAT", 24, 120, 150, (121, 155, 160, 172)))
    asked = [Example("ocr", "ocr", "CAT"), Example("caption", "caption en", "a red circle"),
             Example("vqa", "answer en how many shapes are there?", "1")]
    rows = maker.collate(torch.zeros((1, 3, 224, 224)),
                         [(0, example, maker.regions(scene, example)) for example in asked]).groups[0]
    task_of_row = {r: rows.tasks[i] for i, r in reversed(list(enumerate(rows.loss_rows.tolist())))}
    assert [task_of_row[r] for r in rows.point_rows.tolist()] == ["ocr"] * 3  # C, A, T; not <eos>
    ink = torch.from_numpy(patch_shares(word_ink(scene) > 0, 8))
    assert torch.equal(rows.point_targets, ink.expand(3, -1))
    assert ink[8 * (160 // 28) + 130 // 28] > 0 and ink[0] == 0  # where the word is drawn, not elsewhere


def test_with_point_vqa_an_answer_about_one_object_points_its_first_token_at_that_object(built, codes):
    _, processor = built
    maker = BatchMaker(PromptEncoder.from_processor(processor), ImageTransform.from_processor(processor), codes,
                       seed=3, images=1, prompts=1, point_vqa=True)
    red = SceneObject("circle", "red", (220, 30, 30), 10, 10, 50)
    blue = SceneObject("square", "blue", (30, 30, 220), 150, 140, 60)
    scene = Scene((250, 250, 250), (red, blue), None)
    rng = np.random.default_rng(0)
    asked = [example(scene, "vqa", rng, codes) for _ in range(60)]
    about = [e for e in asked if e.objects]
    # Colour questions and presence questions answered yes are about their object; counts and no are not.
    assert {e.target for e in about} >= {"red", "blue", "yes"} and "no" not in {e.target for e in about}
    assert all(e.objects == ((red,) if "circle" in e.prefix else (blue,)) for e in about)
    assert any(not e.objects and e.target == "no" for e in asked)
    for pointing in (False, True):
        maker.point_vqa = pointing
        rows = maker.collate(torch.zeros((1, 3, 224, 224)),
                             [(0, e, maker.regions(scene, e)) for e in asked]).groups
        points = sum(len(r.point_rows) for r in rows)
        assert points == (len(about) if pointing else 0)
    one = maker.collate(torch.zeros((1, 3, 224, 224)), [(0, about[0], maker.regions(scene, about[0]))]).groups[0]
    prompt_length = int((one.token_type_ids[0] == 0).sum())
    assert one.point_positions.tolist() == [prompt_length - 1]  # where the answer's first token is predicted
    assert torch.equal(one.point_targets[0], torch.from_numpy(patch_shares(object_mask(about[0].objects[0]), 8)))


def test_the_loss_is_the_cross_entropy_of_the_layers_real_attention(built, codes):
    model, processor = built
    batch = _maker(processor, codes).batch(0)
    rows = batch.groups[0]
    pointer = AttentionPointer(model, layer=-1, head=0)
    language = model.model.language_model
    language.config._attn_implementation = "eager"  # attention weights come back only from eager
    try:
        with torch.no_grad():
            vision = model.model.get_image_features(batch.pixel_values).pooler_output
            image = BaseModelOutputWithPooling(pooler_output=vision[rows.image_index])
            attentions = model.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                                     token_type_ids=rows.token_type_ids, mm_encoder_outputs={"image": image},
                                     use_cache=False, output_attentions=True).attentions
            ours = pointer.loss(0, rows.point_rows, rows.point_positions, 64, rows.point_targets)
    finally:
        language.config._attn_implementation = "sdpa"
        pointer.remove()
    real = attentions[-1][rows.point_rows, 0, rows.point_positions, :64]  # head 0 of the last layer
    assert len(rows.point_rows) > 0
    assert float(ours) == pytest.approx(float(-(rows.point_targets * real.log()).sum()), rel=1e-4)
    assert not language.layers[-1].self_attn._forward_pre_hooks  # removed


def test_its_gradient_teaches_the_head_where_to_look(codes):
    model, processor = build("demo", seed=1)
    batch = _maker(processor, codes).batch(1)
    pointer = AttentionPointer(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.set_num_threads(2)
    losses = []
    for _ in range(12):
        _, _, loss = batch_logits(model, batch, autocast=False, pointer=pointer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    pointer.remove()
    assert losses[-1] < 0.7 * losses[0]


def test_the_training_loop_adds_the_pointing_loss_when_asked(codes, caplog):
    config = TrainConfig(steps=2, images=1, prompts=4, eval_every=0, vision_steps=0, pointing_weight=1.0)
    with caplog.at_level("INFO", logger="app.demo.train"):
        model, _, _ = train_model(config, codes)
    [logged] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/2")]
    assert float(logged.split("pointing ")[1].split(",")[0]) > 1.0  # about log(64) at the start
    assert not model.model.language_model.layers[-1].self_attn._forward_pre_hooks  # the hook is gone


def test_forward_passes_in_eval_mode_are_not_kept(codes):
    model, processor = build("demo", seed=2)
    batch = _maker(processor, codes, images=1, prompts=2).batch(0)
    rows = batch.groups[0]
    pointer = AttentionPointer(model)
    image = BaseModelOutputWithPooling(
        pooler_output=model.model.get_image_features(batch.pixel_values).pooler_output[rows.image_index])
    inputs = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask,
              "token_type_ids": rows.token_type_ids, "mm_encoder_outputs": {"image": image}, "use_cache": False}
    with torch.no_grad():
        model.eval()
        model.model(**inputs)  # as a quick evaluation's generation does
        assert pointer.inputs == []
        model.train()
        model.model(**inputs)
    assert len(pointer.inputs) == 1
    pointer.remove()
