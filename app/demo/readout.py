"""What a checkpoint's image tokens carry, read linearly: `python -m app.demo.readout --model DIR`.

The language model reads image tokens through attention, which hands each text position a weighted mean
of some of them. So the question asked here is whether such a mean over the right tokens says the answer
to a linear map: an object's box and its kind (colour and shape) from the mean of its own tokens
(weighted by its share of each patch), which kinds the scene holds from the plain mean of all its tokens
(what attention that has not learned to select reads), the word from the mean of the tokens its ink
touches, and each inked patch's main letter from its token. A ridge regression is fit on 70 % of the
scenes' objects (scenes, words, patches) and scored on the rest; the chance line is what predicting the
training mean (or the most common class, or "absent") scores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from app.demo.probe import KINDS, LETTERS, targets, word_ink
from app.demo.world import CANVAS, WORDS, Scene, generate_scene, object_mask, patch_sums, scene_rng, tight_box

READOUT_STREAM = 6  # scenes of their own stream: not training's, the evaluation's or the export's
TRAIN_SHARE = 0.7
RIDGE = 0.1

Features = Callable[[Scene], np.ndarray]  # a scene's image tokens, (patches, width)


def _ridge(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Predictions for every row of a ridge regression fit on the first 70 % of them."""
    split = int(len(outputs) * TRAIN_SHARE)
    design = np.c_[inputs, np.ones(len(outputs))]
    gram = design[:split].T @ design[:split] + RIDGE * np.eye(design.shape[1])
    return design @ np.linalg.solve(gram, design[:split].T @ outputs[:split])


def _ridge_predictions(inputs: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out predictions, held-out truth, training truth) of a ridge fit on the first 70 %."""
    split = int(len(outputs) * TRAIN_SHARE)
    return _ridge(inputs, outputs)[split:], outputs[split:], outputs[:split]


def _accuracy(inputs: np.ndarray, labels: np.ndarray, classes: int) -> tuple[float, float]:
    """(held-out accuracy, accuracy of always answering the training set's most common class)."""
    predicted, truth, seen = _ridge_predictions(inputs, np.eye(classes)[labels])
    common = int(seen.sum(0).argmax())
    return float((predicted.argmax(1) == truth.argmax(1)).mean()), float((truth.argmax(1) == common).mean())


def _presence_accuracy(inputs: np.ndarray, present: np.ndarray) -> float:
    """Held-out accuracy of "is this kind in the scene", each kind cut at the threshold that does best on
    the training scenes' own predictions (a small object moves the mean less than a large one)."""
    split = int(len(present) * TRAIN_SHARE)
    predicted = _ridge(inputs, present)
    right = []
    for kind in range(present.shape[1]):
        seen, truth = predicted[:split, kind], present[:split, kind] > 0.5
        cut = max(np.unique(seen), key=lambda c: ((seen >= c) == truth).mean())
        right.append((predicted[split:, kind] >= cut) == (present[split:, kind] > 0.5))
    return float(np.mean(right))


def readouts(features: Features, scenes: Sequence[Scene], grid: int) -> dict[str, float]:
    """Held-out linear readouts of boxes (mean edge error in canvas pixels), kinds, words and letters."""
    object_inputs, boxes, kinds, word_inputs, words, letter_inputs, letters = [], [], [], [], [], [], []
    scene_inputs, present = [], []
    for scene in scenes:
        tokens = features(scene)
        scene_inputs.append(tokens.mean(0))
        present.append([float(kind in {obj.name for obj in scene.objects}) for kind in KINDS])
        for obj in scene.objects:
            shares = patch_sums(object_mask(obj).astype(np.float32), grid)
            object_inputs.append(shares / shares.sum() @ tokens)
            boxes.append(tight_box(obj))
            kinds.append(KINDS.index(obj.name))
        if scene.word is not None:
            ink = patch_sums(word_ink(scene), grid)
            word_inputs.append(ink / ink.sum() @ tokens)
            words.append(WORDS.index(scene.word.text))
            letter_class = targets(scene, grid).letter_class.numpy()
            for patch in np.nonzero(letter_class >= 0)[0]:
                letter_inputs.append(tokens[patch])
                letters.append(int(letter_class[patch]))
    predicted, truth, seen = _ridge_predictions(np.array(object_inputs), np.array(boxes, dtype=np.float64))
    kind_accuracy, kind_chance = _accuracy(np.array(object_inputs), np.array(kinds), len(KINDS))
    presence_accuracy = _presence_accuracy(np.array(scene_inputs), np.array(present))
    word_accuracy, word_chance = _accuracy(np.array(word_inputs), np.array(words), len(WORDS))
    letter_accuracy, letter_chance = _accuracy(np.array(letter_inputs), np.array(letters), len(LETTERS))
    return {
        "objects": len(boxes),
        "box_edge_error_px": float(np.abs(predicted - truth).mean()),
        "box_edge_error_px_chance": float(np.abs(truth - seen.mean(0)).mean()),
        "kind_accuracy": kind_accuracy,
        "kind_accuracy_chance": kind_chance,
        "scenes": len(scenes),
        "presence_accuracy": presence_accuracy,
        "presence_accuracy_chance": float((np.array(present)[int(len(present) * TRAIN_SHARE):] == 0).mean()),
        "words": len(words),
        "word_accuracy": word_accuracy,
        "word_accuracy_chance": word_chance,
        "letter_patches": len(letters),
        "letter_accuracy": letter_accuracy,
        "letter_accuracy_chance": letter_chance,
    }


def checkpoint_features(model_dir: Path) -> tuple[Features, int]:
    """The checkpoint's image tokens as the language model receives them, and the patches per side."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from app.demo.world import render
    from app.model.inputs import ImageTransform

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = PaliGemmaProcessor.from_pretrained(model_dir)
    transform = ImageTransform.from_processor(processor)
    config = model.config.vision_config

    def features(scene: Scene) -> np.ndarray:
        with torch.no_grad():
            output = model.model.get_image_features(transform(render(scene))[None])
        return output.pooler_output[0].float().numpy()

    return features, config.image_size // config.patch_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo.readout", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    features, grid = checkpoint_features(args.model)
    assert CANVAS % grid == 0, "the readout's patch sums need patches that tile the 224 px canvas"
    scenes = [generate_scene(scene_rng(READOUT_STREAM, args.seed, i)) for i in range(args.scenes)]
    print(json.dumps(readouts(features, scenes, grid), indent=2))


if __name__ == "__main__":
    main()
