"""The model runner on a real tiny PaliGemma: processor equivalence, batching, limits, feature cache."""

from __future__ import annotations

import pytest
import torch

from app.model.features import FeatureCache
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.loader import load_model
from app.model.runner import ModelInput, ModelRunner
from app.settings import Settings
from tests.helpers import photo


@pytest.fixture(scope="module")
def loaded():
    return load_model(Settings(model="tiny"))


@pytest.fixture(scope="module")
def parts(loaded):
    return ImageTransform.from_processor(loaded.processor), PromptEncoder.from_processor(loaded.processor)


def test_prepared_inputs_equal_what_the_processor_makes(loaded, parts):
    transform, encoder = parts
    for size, prefix in [((300, 200), "caption en"), ((120, 500), "detect a cat ; a dog"), ((224, 224), "ocr")]:
        image = photo(*size, seed=3)
        expected = loaded.processor(text="<image>" + prefix, images=image, return_tensors="pt")
        assert encoder.encode(prefix) == expected["input_ids"][0].tolist()
        assert torch.allclose(transform(image), expected["pixel_values"][0], atol=1e-6)
        assert expected["token_type_ids"].sum() == 0  # nothing to tell apart but the prompt


def _inputs(parts, keys=(None,) * 6):
    transform, encoder = parts
    prompts = ["caption en", "answer en what is it?", "ocr", "detect cat", "segment the dog", "caption de"]
    return [ModelInput(encoder.encode(p), transform(photo(100 + 40 * i, 90, seed=i)), 4 + 3 * i, key)
            for i, (p, key) in enumerate(zip(prompts, keys, strict=True))]


def test_a_left_padded_batch_equals_one_at_a_time_and_honours_each_limit(loaded, parts):
    runner = ModelRunner(loaded)
    inputs = _inputs(parts)
    batched = runner.generate(inputs)
    alone = [runner.generate([item])[0] for item in inputs]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in alone}) > 1
    for item, generation in zip(inputs, batched, strict=True):
        assert generation.completion_tokens <= item.max_new_tokens
        assert generation.prompt_tokens == len(item.input_ids)


def test_the_feature_cache_skips_the_encoder_and_changes_nothing(loaded, parts):
    encoded_images = []
    hook = loaded.model.model.vision_tower.register_forward_hook(
        lambda module, args, output: encoded_images.append(args[0].shape[0]))
    try:
        keys = ("a", "b", "a", "c", "b", "a")  # three distinct images, each asked about twice or more
        inputs = _inputs(parts, keys)
        # Same key, same pixels: what the cache assumes of its callers.
        inputs = [ModelInput(i.input_ids, inputs[keys.index(i.image_key)].pixel_values, i.max_new_tokens,
                             i.image_key) for i in inputs]
        plain = ModelRunner(loaded).generate([ModelInput(i.input_ids, i.pixel_values, i.max_new_tokens)
                                              for i in inputs])
        encoded_images.clear()
        cached_runner = ModelRunner(loaded, feature_cache_size=8)
        first = cached_runner.generate(inputs)
        assert encoded_images == [3]  # one encoder call for three distinct images
        second = cached_runner.generate(inputs)
        assert encoded_images == [3]  # all hits: the encoder did not run again
    finally:
        hook.remove()
    assert [g.token_ids for g in first] == [g.token_ids for g in plain] == [g.token_ids for g in second]
    assert [g.cached_features for g in first] == [False] * 6
    assert all(g.cached_features for g in second)


def test_feature_cache_evicts_least_recently_used():
    cache = FeatureCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", torch.ones(2))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    off = FeatureCache(0)
    off.put("a", torch.zeros(1))
    assert off.get("a") is None and len(off) == 0
