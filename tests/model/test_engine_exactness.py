"""The step engine on real PaliGemmas equals `model.generate` on each request alone.

Requests join at arbitrary steps, with different prompts, images and max_new_tokens, some cancelled
midway; each request that finishes must have exactly the tokens plain `generate` gives it alone (greedy,
float32 on the CPU). Run on the `tiny` preset, on PaliGemma 2's layout (`tiny-gemma2`: Gemma 2 layers,
a sliding window that decoding crosses), on the 448 px layout (`tiny-448`: 1024 image tokens), and on a
checkpoint trained in the tests to emit known detections and masks (which ends with <eos>).
"""

from __future__ import annotations

import random

import pytest
import torch

from app.engine.core import EngineCore
from app.engine.graphs import Capture
from app.engine.observer import NullObserver
from app.engine.runner import ModelStepRunner, RowInput, RunnerConfig
from app.engine.scheduler import Scheduler, Sequence, State
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.loader import LoadedModel, load_model
from app.settings import Settings
from tests.images import photo
from tests.trained_model import EXAMPLES, training_image

PROMPTS = ["caption en", "answer en what is on the table?", "ocr", "detect cat ; dog", "segment the red car",
           "caption de", "describe en", "answer fr combien de chats"]


def generate_alone(loaded: LoadedModel, item: RowInput, max_new_tokens: int) -> list[int]:
    """What plain `generate` gives this request by itself, cut at <eos> like the engine's output."""
    ids = torch.tensor([item.input_ids])
    out = loaded.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
        pixel_values=item.pixel_values[None].to(loaded.dtype), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=list(loaded.eos_token_ids), pad_token_id=loaded.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    for i, token in enumerate(tokens):
        if token in loaded.eos_token_ids:
            return tokens[:i]
    return tokens


class Driver:
    """The real worker loop and model runner, stepped one step at a time by the test."""

    def __init__(self, loaded: LoadedModel, rows: int, prefill_token_budget: int, max_new_tokens: int = 40,
                 graph_capture: Capture | None = None, **runner_options):
        self.loaded = loaded
        self.runner = ModelStepRunner(loaded, RunnerConfig(rows=rows, max_prompt_tokens=64,
                                                           max_new_tokens=max_new_tokens, **runner_options),
                                      graph_capture)
        self.scheduler = Scheduler(rows, prefill_token_budget)
        self.events: list = []
        self.joined_while_running = 0  # prefills that happened while other rows were generating
        prefill = self.runner.prefill

        def counting_prefill(seqs: list[Sequence]) -> list[int]:
            self.joined_while_running += len(self.scheduler.running) > len(seqs)
            return prefill(seqs)

        self.runner.prefill = counting_prefill  # type: ignore[method-assign]
        self.loop = EngineCore(self.scheduler, self.runner, self.events.append, NullObserver(), lambda exc: False,
                               lambda exc: False)

    def submit(self, item: RowInput, max_new_tokens: int) -> Sequence:
        seq = Sequence(len(item.input_ids), max_new_tokens, frozenset(self.loaded.eos_token_ids), item)
        self.loop.submit(seq)
        return seq


def make_input(loaded: LoadedModel, prompt: str, seed: int) -> RowInput:
    encoder = PromptEncoder.from_processor(loaded.processor)
    transform = ImageTransform.from_processor(loaded.processor)
    return RowInput(encoder.encode(prompt), transform(photo(60 + 17 * (seed % 20), 50 + 11 * (seed % 13), seed=seed)))


def run_schedule(loaded: LoadedModel, seed: int, count: int = 12, rows: int = 4):
    rng = random.Random(seed)
    driver = Driver(loaded, rows=rows, prefill_token_budget=2 * (loaded.image_seq_length + 20))
    plans = []
    for _ in range(count):
        item = make_input(loaded, rng.choice(PROMPTS), rng.randrange(1000))
        arrive = rng.randrange(0, 30)
        cancel = arrive + rng.randrange(1, 12) if rng.random() < 0.25 else None
        plans.append((arrive, cancel, item, rng.randrange(1, 28)))
    seqs: list[Sequence | None] = [None] * count
    step = 0
    while step < 1000:
        for i, (arrive, cancel, item, max_new) in enumerate(plans):
            if arrive == step:
                seqs[i] = driver.submit(item, max_new)
            if cancel == step and seqs[i] is not None:
                seqs[i].cancel_reason = "disconnected"
        assert driver.loop.step_once()
        step += 1
        if step > 30 and driver.scheduler.idle:
            break
    return plans, seqs, driver


@pytest.fixture(scope="module", params=["tiny", "tiny-gemma2", "tiny-448"])
def preset_model(request) -> LoadedModel:
    return load_model(Settings(model=request.param))


def check_schedule(loaded: LoadedModel, seed: int, count: int = 12) -> None:
    """Every request of a random schedule that finishes has the tokens `generate` gives it alone."""
    plans, seqs, driver = run_schedule(loaded, seed, count)
    finished = 0
    for (_, cancel, item, max_new), seq in zip(plans, seqs, strict=True):
        assert seq is not None and seq.done
        if seq.state is State.DROPPED:
            assert cancel is not None
            continue
        finished += 1
        assert seq.output_tokens == generate_alone(loaded, item, max_new)
    assert finished >= len(plans) // 2
    assert driver.joined_while_running > 0  # some joined while others were generating


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_arrivals_and_cancellations_equal_generate_alone(preset_model, seed):
    check_schedule(preset_model, seed)


def test_outputs_differ_between_requests_so_the_comparison_means_something():
    loaded = load_model(Settings(model="tiny"))
    outputs = {tuple(generate_alone(loaded, make_input(loaded, prompt, seed), 12))
               for seed, prompt in enumerate(PROMPTS)}
    assert len(outputs) >= len(PROMPTS) // 2


def test_a_trained_checkpoint_gives_its_known_outputs_batched_with_strangers(trained_checkpoint):
    loaded = load_model(Settings(model=str(trained_checkpoint)))
    encoder = PromptEncoder.from_processor(loaded.processor)
    transform = ImageTransform.from_processor(loaded.processor)
    pixels = transform(training_image())
    driver = Driver(loaded, rows=3, prefill_token_budget=10_000, max_new_tokens=64)
    known = [driver.submit(RowInput(encoder.encode(example.prefix), pixels), 64) for example in EXAMPLES]
    strangers = [driver.submit(make_input(loaded, prompt, seed), 20) for seed, prompt in enumerate(PROMPTS[:4])]
    driver.loop.run_until_idle()
    for seq, example in zip(known, EXAMPLES, strict=True):
        assert seq.finish_reason == "stop"  # it ended with <eos>, not at the limit
        assert encoder.decode(seq.output_tokens) == example.target
    for seq in strangers:
        assert seq.output_tokens == generate_alone(loaded, seq.payload, 20)


def test_the_448_layout_sizes_cache_rows_for_1024_image_tokens():
    loaded = load_model(Settings(model="tiny-448"))
    runner = ModelStepRunner(loaded, RunnerConfig(rows=2, max_prompt_tokens=64, max_new_tokens=40))
    assert loaded.image_seq_length == 1024
    assert runner.shape.length == 1024 + 64 + 40
    assert runner.cache.keys[0].shape[2] == runner.shape.length + 1  # + the scratch index
