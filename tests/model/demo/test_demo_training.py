"""Training the demo model and its mask VQ-VAE, in a few steps: the loss falls, and what is saved loads
through the server's own paths."""

import hashlib
import json
import logging
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from app.demo import WEIGHTS_DIR
from app.demo.batches import BatchMaker
from app.demo.mask_vqvae import MaskTokenizer, all_crops, save_npz, train_mask_vqvae
from app.demo.train import (
    ARCHITECTURES,
    TrainConfig,
    batch_logits,
    build,
    clip_gradients,
    loc_ids,
    parse_args,
    run,
    save_checkpoint,
    train_model,
)
from app.masks.decoder import MaskDecoder, load_mask_decoder
from app.model import presets
from app.model.inputs import ImageTransform, PromptEncoder


@pytest.fixture(scope="module")
def vqvae_file(tmp_path_factory):
    model = train_mask_vqvae(seed=0, steps=30, batch_size=8)
    return save_npz(model, tmp_path_factory.mktemp("vqvae") / "vae-demo.npz")


def test_the_mask_vqvae_file_loads_through_the_servers_decoder_path(vqvae_file):
    decoder = MaskDecoder.from_npz(vqvae_file)  # every key, shape and dtype checked; strict load
    assert set(MaskDecoder.expected_shapes()) <= set(np.load(vqvae_file).files)
    loaded = load_mask_decoder(vqvae_file, bundled=True)
    assert loaded.matches_published is False
    tokenizer = MaskTokenizer(vqvae_file)
    _, crops = all_crops()
    codes = tokenizer.codes_of_crops(crops[:4])
    assert codes.shape == (4, 16) and codes.min() >= 0 and codes.max() < 128
    assert decoder.decode(codes).shape == (4, 64, 64)


def test_a_few_mask_vqvae_steps_lower_its_reconstruction_loss():
    logged: list[str] = []
    train_mask_vqvae(seed=1, steps=50, batch_size=8, log=logged.append)
    first, last = (float(line.split("reconstruction ")[1]) for line in (logged[0], logged[-1]))
    assert last < first


def test_a_few_training_steps_lower_the_loss(vqvae_file):
    # No vision pre-training here (600 steps by default): the loop itself is what is under test.
    config = TrainConfig(steps=16, images=2, prompts=3, warmup=2, lr=3e-3, eval_every=0, vision_steps=0)
    torch.set_num_threads(2)
    _, _, losses = train_model(config, MaskTokenizer(vqvae_file))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_the_model_is_built_as_the_presets_are_and_saves_as_an_ordinary_checkpoint(tmp_path):
    model, processor = build("demo", seed=0)
    preset = ARCHITECTURES["demo"]
    assert model.config.to_dict() == presets.build_config(preset, processor.tokenizer).to_dict()
    first, end = loc_ids(processor)
    embeddings = model.get_input_embeddings().weight[first:end]
    # Loc embeddings start smooth: neighbouring bins alike, far ones not.
    near = torch.nn.functional.cosine_similarity(embeddings[:-1], embeddings[1:]).mean()
    far = torch.nn.functional.cosine_similarity(embeddings[:512], embeddings[512:]).mean()
    assert near > 0.9 and far < 0.5
    save_checkpoint(model, processor, tmp_path, "float16")
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "processor_config.json").is_file()


def test_eager_attention_trains_the_same_model_as_sdpa_and_stays_out_of_the_checkpoint(vqvae_file, tmp_path):
    # The same weights from the seed, the same logits (float32: only the summation order differs), and a
    # run trains with what its config names.
    (eager, processor), (sdpa, _) = build("demo", seed=0, attention="eager"), build("demo", seed=0, attention="sdpa")
    assert (eager.config.text_config._attn_implementation, sdpa.config.text_config._attn_implementation,
            eager.config.vision_config._attn_implementation) == ("eager", "sdpa", "eager")
    maker = BatchMaker(PromptEncoder.from_processor(processor), ImageTransform.from_processor(processor),
                       MaskTokenizer(vqvae_file), seed=3, images=2, prompts=4)
    batch = maker.batch(0)
    with torch.no_grad():
        assert torch.allclose(batch_logits(eager, batch, autocast=False)[0],
                              batch_logits(sdpa, batch, autocast=False)[0], atol=1e-4)
    config = TrainConfig(steps=1, images=1, prompts=2, vision_steps=0, eval_every=0, attention="eager")
    trained, _, _ = train_model(config, MaskTokenizer(vqvae_file))
    assert trained.config.text_config._attn_implementation == "eager"
    # Serving chooses its own: the saved config names none.
    save_checkpoint(trained, processor, tmp_path, "float16")
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    with pytest.raises(SystemExit):
        parse_args(["--attention", "flash_attention_2"])


def test_polishing_a_saved_checkpoint_trains_the_same_weights_as_polishing_within_the_run(vqvae_file, tmp_path,
                                                                                          request):
    # The polish phase starts from what was saved either way, so a main phase's checkpoint on disk can be
    # polished later with the same result as one command doing both (the shipped recipe's claim).
    config = TrainConfig(steps=2, images=1, prompts=2, warmup=1, vision_steps=2, vision_images=2, eval_every=0,
                         batch_workers=0, threads=1, polish_steps=2, polish_warmup=1, polish_lr=1e-3)
    threads = torch.get_num_threads()  # run() sets the process's (one thread: the same sums every run)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def weights(directory):
        return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()

    at_once = run(config, tmp_path / "at-once", vqvae_file)
    assert at_once["polish_seconds"] > 0 and "polished_from" not in at_once
    run(replace(config, polish_steps=0), tmp_path / "main", vqvae_file)
    later = run(config, tmp_path / "later", vqvae_file, polish_from=tmp_path / "main")
    assert later["polished_from"] == str(tmp_path / "main") and "main_seconds" not in later
    assert weights(tmp_path / "at-once") == weights(tmp_path / "later") != weights(tmp_path / "main")
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json"):
        assert (tmp_path / "at-once" / name).read_bytes() == (tmp_path / "main" / name).read_bytes(), name
        assert (tmp_path / "later" / name).read_bytes() == (tmp_path / "main" / name).read_bytes(), name
    with pytest.raises(ValueError, match="polish_steps"):
        run(replace(config, polish_steps=0), tmp_path / "none", vqvae_file, polish_from=tmp_path / "main")
    with pytest.raises(SystemExit):
        parse_args(["--polish-from", "x", "--polish-steps", "0"])
    with pytest.raises(ValueError, match="polish_steps"):
        TrainConfig(polish_steps=-1)
    with pytest.raises(ValueError):
        TrainConfig(polish_task_weights="vqa=1")


def test_batches_use_the_servers_prompt_encoding_and_image_preprocessing(vqvae_file):
    _, processor = build("demo", seed=0)
    encoder = PromptEncoder.from_processor(processor)
    maker = BatchMaker(encoder, ImageTransform.from_processor(processor), MaskTokenizer(vqvae_file), seed=3,
                       images=2, prompts=4)
    batch = maker.batch(0)
    assert batch.pixel_values.shape == (2, 3, 224, 224)
    rows = batch.groups[0]
    prompt_length = int((rows.token_type_ids[0] == 0).sum())
    assert rows.input_ids[0, :prompt_length].tolist()[:encoder.image_seq_length] == (
        [encoder.image_token_id] * encoder.image_seq_length)
    assert rows.input_ids[0, encoder.image_seq_length].item() == encoder.bos_token_id


def test_every_config_field_is_a_flag_and_switches_turn_off():
    config, out, _, _ = parse_args(["--out", "x", "--steps", "12", "--no-autocast", "--no-probe-letters", "--probe-words"])
    assert (config.steps, config.autocast, config.probe_letters, config.probe_words) == (12, False, False, True)
    assert str(out) == "x"
    assert parse_args([])[0] == TrainConfig()


def test_the_shipped_weights_were_trained_with_the_recipe_s_defaults():
    # docs/demo.md says `TrainConfig`'s defaults are the shipped weights' recipe (seed included), so that
    # `make demo-model` trains what is shipped; the training record says what they were trained with.
    # `batch_workers` only says where the batches are drawn, not what they are (the bit-for-bit test
    # below trains with and without), so a record from before it existed still names the recipe.
    shipped = json.loads((WEIGHTS_DIR / "training.json").read_text())["config"]
    recipe = asdict(TrainConfig())
    for same_weights_either_way in ("batch_workers",):
        shipped.pop(same_weights_either_way, None)
        recipe.pop(same_weights_either_way)
    # A record from before the late tower box weight existed trained without it: the recipe's must be off.
    if "vision_box_step" not in shipped:
        assert recipe.pop("vision_box_step") == 0
        recipe.pop("vision_box_weight_after")
    if "attention" not in shipped:  # and one from before the choice of attention trained with sdpa
        assert recipe.pop("attention") == "sdpa"
    if "polish_steps" not in shipped:  # and one from before the polish phase had none
        assert recipe.pop("polish_steps") == 0
        for unused in ("polish_lr", "polish_warmup", "polish_task_weights"):
            recipe.pop(unused)
    assert shipped == recipe


def test_a_bad_task_mixture_is_refused_on_the_command_line_before_anything_trains(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--task-weights", "vqa=1"])
    assert exited.value.code == 2 and "detect, segment, caption, ocr missing" in capsys.readouterr().err
    config, _, _, _ = parse_args(["--task-weights", "detect=1,segment=1,caption=1,vqa=2,ocr=0"])
    assert config.task_weights == "detect=1,segment=1,caption=1,vqa=2,ocr=0"
    with pytest.raises(SystemExit):
        parse_args(["--vision-word-probability", "1.5"])
    assert "within [0, 1], not 1.5" in capsys.readouterr().err
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--ocr-wordless-weight", bad])
        assert f"within (0, 1], not {float(bad)}" in capsys.readouterr().err
    assert parse_args(["--ocr-wordless-weight", "0.2"])[0].ocr_wordless_weight == 0.2
    with pytest.raises(SystemExit):
        parse_args(["--batch-workers", "-1"])
    assert "batch_workers must be 0 or more, not -1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [
    ("--vision-box-step", "-1", "vision_box_step must be 0 or more, not -1"),
    ("--vision-box-weight-after", "-0.5", "vision_box_weight_after must be 0 or more, not -0.5"),
    ("--steps", "-10", "steps must be 0 or more, not -10"),
    ("--threads", "0", "threads must be 1 or more, not 0"),
    ("--images", "0", "images must be 1 or more, not 0"),
    ("--loc-sigma", "0", "loc_sigma must be above 0"),
    ("--loc-peak", "1.5", "loc_peak within [0, 1]"),
])
def test_a_step_or_weight_out_of_its_range_is_refused_before_anything_trains(capsys, flag, value, says):
    with pytest.raises(SystemExit) as exited:
        parse_args([flag, value])
    assert exited.value.code == 2 and says in capsys.readouterr().err
    # At its floor it is a setting: a tower phase without a late box weight, no vision-only steps
    assert parse_args(["--vision-box-step", "0", "--vision-steps", "0"])[0].vision_steps == 0


def test_the_box_target_can_weigh_differently_while_the_vision_tower_trains_alone_and_later(vqvae_file):
    assert TrainConfig(probe_box_weight=0.3, vision_probe_box_weight=-1).vision_box_weight == 0.3  # < 0: the same
    assert TrainConfig().vision_box_weight == 0.1 and TrainConfig().probe_box_weight == 1.0  # the recipe's
    config, _, _, _ = parse_args(["--probe-box-weight", "0", "--vision-probe-box-weight", "1",
                               "--probe-box-drop-step", "1", "--probe-box-weight-after", "0.5"])
    assert (config.vision_box_weight, config.probe_box_weight, config.probe_box_weight_after) == (1.0, 0, 0.5)
    # The box head exists for the phases that ask for it, and the one between runs without the term.
    config = replace(config, steps=2, images=2, prompts=2, vision_steps=2, vision_images=2, eval_every=0)
    _, _, losses = train_model(config, MaskTokenizer(vqvae_file))
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_late_in_the_tower_phase_the_box_term_can_weigh_more_and_only_from_its_step_on(vqvae_file):
    config, _, _, _ = parse_args(["--vision-box-step", "2", "--vision-box-weight-after", "1.0"])
    assert (config.vision_box_step, config.vision_box_weight_after) == (2, 1.0)
    assert TrainConfig().vision_box_step == 3000  # the recipe's: the tower's last 1000 steps of 4000
    small = dict(steps=1, images=2, prompts=2, vision_steps=3, vision_images=2, eval_every=0, batch_workers=0,
                 vision_box_step=0)
    codes = MaskTokenizer(vqvae_file)

    def tower_after(**changes) -> torch.Tensor:
        model, _, _ = train_model(TrainConfig(**{**small, **changes}), codes)
        return torch.cat([p.detach().flatten() for p in model.model.vision_tower.parameters()])

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a run is the same bit for bit on one thread
    try:
        plain = tower_after()
        # Off (step 0), its weight changes nothing; from the tower's last step, that step learns otherwise.
        assert torch.equal(tower_after(vision_box_weight_after=5.0), plain)
        assert not torch.equal(tower_after(vision_box_step=2, vision_box_weight_after=5.0), plain)
        # From a step past the tower phase, nothing changes either.
        assert torch.equal(tower_after(vision_box_step=3, vision_box_weight_after=5.0), plain)
    finally:
        torch.set_num_threads(before)


def test_a_capped_box_target_trains_and_logs_its_gradients_share_before_the_cap(vqvae_file, caplog):
    config = TrainConfig(steps=2, images=2, prompts=2, vision_steps=1, vision_images=2, eval_every=0,
                         probe_box_weight=1.0, probe_box_share=0.5, clip_probe_apart=True)
    with caplog.at_level(logging.INFO, logger="app.demo.train"):
        _, _, losses = train_model(config, MaskTokenizer(vqvae_file))
    assert len(losses) == 2 and all(np.isfinite(losses))
    share = float(caplog.text.split("box/rest gradient ")[1].split(",")[0])
    assert share > 0


def test_clipped_apart_a_huge_probe_gradient_leaves_the_models_step_as_it_is():
    model, probe = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for apart, model_norm in ((False, None), (True, 0.5)):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5 / math.sqrt(20))  # norm 0.5 over the model's 20 values
        for p in probe.parameters():
            p.grad = torch.full_like(p, 100.0)
        norm = clip_gradients(model, probe, 1.0, apart)
        after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        probe_after = torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()
        if apart:
            assert norm == pytest.approx(0.5) and float(after) == pytest.approx(model_norm)  # untouched
            assert float(probe_after) == pytest.approx(1.0)
        else:  # together, the probe's gradient shrinks the model's ~450 times
            assert norm == pytest.approx(math.hypot(0.5, 100 * math.sqrt(20)), rel=1e-4)
            assert float(after) == pytest.approx(0.5 / norm, rel=1e-3)


def test_on_one_thread_two_runs_of_a_seed_are_the_same_bit_for_bit_with_batches_made_ahead_or_not(vqvae_file):
    # What makes the shipped weights reproducible: the default recipe (box and attention targets on) on
    # the default single thread, both phases; the batches drawn in a process of their own (the default)
    # or by the training process.
    config = TrainConfig(steps=3, images=1, prompts=3, warmup=1, vision_steps=2, vision_images=2, eval_every=0)
    assert config.threads == 1 and config.batch_workers == 1
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        runs = [train_model(replace(config, batch_workers=workers), MaskTokenizer(vqvae_file))
                for workers in (1, 0)]
    finally:
        torch.set_num_threads(before)
    (first, _, first_losses), (second, _, second_losses) = runs
    assert first_losses == second_losses
    second_state = second.state_dict()
    assert all(torch.equal(value, second_state[name]) for name, value in first.state_dict().items())
