"""In-process evaluation of a demo checkpoint on held-out scenes, with the server's own input encoding,
output parsing and mask placement (`python -m app.demo.evaluate --seed S --count N`).

This is the quick check training runs now and then; the numbers quoted for the shipped model are
measured through the HTTP API on an exported dataset (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from app.demo import MASK_DECODER_FILE, WEIGHTS_DIR, answers
from app.demo.batches import as_sent
from app.demo.scoring import Tally, best_iou, box_iou, caption_mistake, detect_outcome, edge_errors, mask_iou
from app.demo.world import (
    CANVAS,
    SHAPES,
    Scene,
    SceneObject,
    generate_scene,
    object_mask,
    render,
    scene_rng,
    tight_box,
)
from app.masks.decoder import MaskDecoder
from app.masks.placement import place_mask
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.presets import loc_ids
from app.tasks.parsing import parse_objects, strip_location_tokens

EVAL_STREAM = 3
_BATCH = 32


@dataclass(frozen=True)
class Answer:
    """A greedy answer, and its first token's distribution as two classes: the end of the answer (an
    empty one) against every `<loc>` token together (a box starts)."""

    text: str
    first_end: float
    first_loc: float


class Answerer:
    """Greedy answers of a model to (image, prefix) pairs, batched with left padding as serving does."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor) -> None:
        self.model = model
        self.encoder = PromptEncoder.from_processor(processor)
        self.transform = ImageTransform.from_processor(processor)
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.end_id = int(processor.tokenizer.eos_token_id)
        self.first_loc, self.end_loc = loc_ids(processor)

    def __call__(self, pairs: Sequence[tuple[Image.Image, str]], max_new_tokens: int = 96) -> list[str]:
        return [answer.text for answer in self.answers(pairs, max_new_tokens)]

    @torch.inference_mode()
    def answers(self, pairs: Sequence[tuple[Image.Image, str]], max_new_tokens: int = 96) -> list[Answer]:
        answered: list[Answer] = []
        for start in range(0, len(pairs), _BATCH):
            chunk = pairs[start:start + _BATCH]
            prompts = [self.encoder.encode(prefix) for _, prefix in chunk]
            length = max(map(len, prompts))
            ids = torch.tensor([[self.pad_id] * (length - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
            pixels = torch.stack([self.transform(image) for image, _ in chunk])
            out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                      token_type_ids=torch.zeros_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, output_scores=True, return_dict_in_generate=True)
            # Greedy without processors: the first step's scores are its logits.
            first = out.scores[0].float().softmax(-1)
            ends = first[:, self.end_id].tolist()
            locs = first[:, self.first_loc:self.end_loc].sum(-1).tolist()
            answered += [Answer(self.encoder.decode(row[length:].tolist()), end, loc)
                         for row, end, loc in zip(out.sequences, ends, locs, strict=True)]
        return answered


def scene_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float, float]:
    """The object's tight box in pixels of the scene drawn at (or resized to) width x height."""
    x0, y0, x1, y1 = tight_box(obj)
    sx, sy = width / CANVAS, height / CANVAS
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def _mask_at(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if (width, height) == (CANVAS, CANVAS):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def _questions(scene: Scene) -> list[tuple[str, str]]:
    asked = [(answers.HOW_MANY, answers.count_answer(scene))]
    for shape in SHAPES:
        color = answers.color_answer(scene, shape)
        if color is not None:
            asked.append((answers.color_question(shape), color))
    first = scene.objects[0]
    asked.append((answers.presence_question(first.color, first.shape), "yes"))
    present = {obj.name for obj in scene.objects}
    absent = next(f"{c} {s}" for c in ("yellow", "blue", "green", "red") for s in SHAPES
                  if f"{c} {s}" not in present)
    asked.append((answers.presence_question(*absent.split()), "no"))
    return asked


def in_process(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor, mask_decoder: Path,
               seed: int, count: int) -> dict[str, float]:
    """Scores on `count` held-out scenes (half as drawn, half resized and/or JPEG as clients may send)."""
    answer = Answerer(model, processor)
    decoder = MaskDecoder.from_npz(mask_decoder)
    pairs: list[tuple[Image.Image, str]] = []
    checks: list[tuple[str, Scene, object, Image.Image]] = []
    for index in range(count):
        rng = scene_rng(EVAL_STREAM, seed, index)
        scene = generate_scene(rng)
        image = render(scene) if index % 2 == 0 else as_sent(render(scene), rng)
        for obj in scene.objects:
            pairs += [(image, answers.detect_prompt([obj.name])), (image, answers.segment_prompt([obj.name]))]
            checks += [("detect", scene, obj, image), ("segment", scene, obj, image)]
        pairs.append((image, answers.caption_prompt()))
        checks.append(("caption", scene, answers.caption(scene), image))
        for question, expected in _questions(scene):
            pairs.append((image, answers.vqa_prompt(question)))
            checks.append(("vqa", scene, expected, image))
        pairs.append((image, answers.ocr_prompt()))
        checks.append(("ocr", scene, answers.ocr_answer(scene), image))
    tally = Tally()
    for answered, (task, scene, what, image) in zip(answer.answers(pairs), checks, strict=True):
        text = answered.text
        width, height = image.size
        if task in ("detect", "segment"):
            parsed = parse_objects(text).objects
            truth = scene_box(what, width, height)  # type: ignore[arg-type]
            boxes = [tuple(o.box.to_pixels(width, height).__dict__.values()) for o in parsed]
            if task == "detect":
                tally.detect_ious.append(best_iou(truth, boxes))
                others = [scene_box(obj, width, height) for obj in scene.objects if obj is not what]
                outcome = detect_outcome(truth, others, boxes)
                tally.detect_outcomes[outcome] += 1
                if outcome == "empty":
                    tally.empty_first_steps.append((answered.first_end, answered.first_loc))
                if boxes:
                    best = max(boxes, key=lambda box: box_iou(truth, box))
                    tally.edge_errors.append(edge_errors(truth, best, CANVAS / width, CANVAS / height))
                continue
            usable = [o for o in parsed if o.mask_tokens is not None and o.mask_problem is None]
            predicted = None
            if usable:
                logits = decoder.decode(np.array([usable[0].mask_tokens]))[0]
                b = usable[0].box
                predicted = place_mask(logits, (b.x_min, b.y_min, b.x_max, b.y_max), width, height)
            tally.mask_ious.append(mask_iou(_mask_at(object_mask(what), width, height), predicted))  # type: ignore[arg-type]
        else:
            said = strip_location_tokens(text)
            tally.add_exact(task, said, str(what))
            if task == "caption":
                tally.caption_mistakes[caption_mistake(said, str(what))] += 1
    return tally.summary()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = PaliGemmaProcessor.from_pretrained(args.model)
    print(json.dumps(in_process(model, processor, args.model / MASK_DECODER_FILE, args.seed, args.count)))


if __name__ == "__main__":
    main()
