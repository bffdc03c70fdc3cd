"""Training batches: scenes drawn from a seeded stream, their images as a client might send them, and
their prompts and targets as token rows, all through the server's own preprocessing.

- Images: the rendered scene, at another size and/or as JPEG (quality 85 to 100) as the world's rules
  allow, then `ImageTransform` (the checkpoint's resize and normalisation, exactly what serving runs).
- Prompts: `PromptEncoder.encode` (image tokens, `<bos>`, prefix, `\\n`: what serving feeds the model);
  targets: the tokenizer's ids of the answer, then `<eos>`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from app.demo.answers import MaskCodes
from app.demo.examples import Example, examples
from app.demo.pointing import patch_shares
from app.demo.probe import ProbeTargets, targets, word_ink
from app.demo.world import WORD_PROBABILITY, Scene, generate_scene, object_mask, render, scene_rng
from app.model import presets
from app.model.inputs import ImageTransform, PromptEncoder

TRAIN_STREAM = 1
VISION_STREAM = 5
_RESAMPLES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
              Image.Resampling.BOX)


def as_sent(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The scene as it may arrive: a quarter as drawn, the rest resized (112 to 448 px a side, the aspect
    kept or not) and/or JPEG-compressed at quality 85 to 100."""
    roll = rng.random()
    if roll < 0.25:
        return image
    if roll < 0.75:
        width = int(rng.integers(112, 449))
        height = width if rng.random() < 0.5 else int(rng.integers(112, 449))
        image = image.resize((width, height), _RESAMPLES[int(rng.integers(len(_RESAMPLES)))])
    if roll >= 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(85, 101)),
                   subsampling=int(rng.integers(0, 3)))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return image


@dataclass(frozen=True)
class Rows:
    """Token rows of similar length (padding costs compute, so rows are grouped by length)."""

    image_index: torch.Tensor  # (rows,) which image of the batch each row reads
    input_ids: torch.Tensor  # (rows, length), right-padded
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor  # 0: image + prefix (bidirectional), 1: suffix (causal)
    # Where the loss is taken: logits at (row, position) predict `targets`.
    loss_rows: torch.Tensor
    loss_positions: torch.Tensor
    targets: torch.Tensor
    tasks: list[str]  # per target token, for per-task losses
    # Where the answer is about a part of the image (app.demo.pointing): the positions that predict an
    # object's loc / seg tokens or the word's letters, and the share of that part's pixels in each patch.
    point_rows: torch.Tensor
    point_positions: torch.Tensor
    point_targets: torch.Tensor  # (points, image tokens)


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor  # (images, 3, H, W)
    groups: list[Rows]
    probe: list[ProbeTargets] = field(default_factory=list)  # per image, for the vision probe

    @property
    def targets(self) -> torch.Tensor:
        return torch.cat([g.targets for g in self.groups])

    @property
    def tasks(self) -> list[str]:
        return [task for g in self.groups for task in g.tasks]


class BatchMaker:
    """Seeded batches of `images` scenes x `prompts` prompts each."""

    def __init__(self, encoder: PromptEncoder, transform: ImageTransform, codes: MaskCodes, seed: int,
                 images: int, prompts: int, augment: bool = True, point_vqa: bool = False,
                 task_weights: dict[str, float] | None = None, wordless_ocr: float = 1.0) -> None:
        self.encoder = encoder
        self.task_weights = task_weights  # None: examples.TASK_WEIGHTS
        self.wordless_ocr = wordless_ocr  # OCR's weight on a scene without a word, times the mixture's
        self.point_vqa = point_vqa
        self.transform = transform
        self.codes = codes
        self.seed = seed
        self.images = images
        self.prompts = prompts
        self.augment = augment
        self.grid = math.isqrt(encoder.image_seq_length)  # patches per side
        tokenizer = encoder.processor.tokenizer
        self._tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.loc_ids = set(tokenizer.convert_tokens_to_ids(list(presets.LOC_TOKENS)))
        self.seg_ids = set(tokenizer.convert_tokens_to_ids(list(presets.SEG_TOKENS)))

    def target_ids(self, text: str) -> list[int]:
        return [*self._tokenizer(text, add_special_tokens=False)["input_ids"], self.eos_id]

    def batch(self, step: int, most_objects: int = 3) -> Batch:
        """Batch `step` of the stream: the same every time for the same seed and step."""
        pixels, rows, probe = [], [], []
        for i in range(self.images):
            index = step * self.images + i
            rng = scene_rng(TRAIN_STREAM, self.seed, index)
            scene = generate_scene(rng, most_objects)
            image = render(scene)
            if self.augment:
                image = as_sent(image, rng)
            pixels.append(self.transform(image))
            probe.append(targets(scene, self.grid))
            drawn = examples(scene, self.prompts, rng, self.codes, self.task_weights, self.wordless_ocr)
            rows += [(i, ex, self.regions(scene, ex)) for ex in drawn]
        return replace(self.collate(torch.stack(pixels), rows), probe=probe)

    def regions(self, scene: Scene, example: Example) -> list[np.ndarray]:
        """Per patch, the share of each part of the image the answer is about: the objects of a detect /
        segment answer in its order, the word an OCR answer reads, or with `point_vqa` the object a VQA
        answer is about."""
        if example.task == "ocr" and scene.word is not None:
            return [patch_shares(word_ink(scene) > 0, self.grid)]
        if example.task == "vqa" and not self.point_vqa:  # only pointing reads a VQA answer's object
            return []
        return [patch_shares(object_mask(obj), self.grid) for obj in example.objects]

    def images_only(self, step: int, count: int, word_probability: float = WORD_PROBABILITY
                    ) -> tuple[torch.Tensor, list[ProbeTargets]]:
        """Images and probe targets of their own stream (the vision tower's warm-up, app.demo.train);
        `word_probability` is the share of them that hold a word."""
        pixels, probe = [], []
        for i in range(count):
            rng = scene_rng(VISION_STREAM, self.seed, step * count + i)
            scene = generate_scene(rng, word_probability=word_probability)
            image = as_sent(render(scene), rng) if self.augment else render(scene)
            pixels.append(self.transform(image))
            probe.append(targets(scene, self.grid))
        return torch.stack(pixels), probe

    def collate(self, pixel_values: torch.Tensor, rows: list[tuple[int, Example, list[np.ndarray]]],
                group_rows: int = 16) -> Batch:
        encoded = [(i, ex.task, self.encoder.encode(ex.prefix), self.target_ids(ex.target), regions)
                   for i, ex, regions in rows]
        encoded.sort(key=lambda row: len(row[2]) + len(row[3]))
        groups = [self._rows(encoded[s:s + group_rows]) for s in range(0, len(encoded), group_rows)]
        return Batch(pixel_values=pixel_values, groups=groups)

    def _points(self, task: str, target: list[int], regions: list[np.ndarray]
                ) -> list[tuple[int, np.ndarray]]:
        """(index in the target, region) of the target tokens that are about a region: an object's loc and
        seg tokens (its four locs start it), every letter of the word, and with `point_vqa` a VQA answer
        about one object (its colour, or that it is there)."""
        if task == "ocr":
            return [(j, regions[0]) for j in range(len(target) - 1)] if regions else []
        if task == "vqa":
            return [(0, regions[0])] if regions else []
        points, locs = [], 0
        for j, token in enumerate(target):
            if token in self.loc_ids:
                locs += 1
            if token in self.loc_ids or token in self.seg_ids:
                points.append((j, regions[(locs - 1) // 4]))
        return points

    def _rows(self, encoded: list[tuple[int, str, list[int], list[int], list[np.ndarray]]]) -> Rows:
        length = max(len(p) + len(t) for _, _, p, t, _ in encoded)
        count = len(encoded)
        input_ids = torch.full((count, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((count, length), dtype=torch.long)
        types = torch.ones((count, length), dtype=torch.long)
        loss_rows, loss_positions, targets, tasks = [], [], [], []
        point_rows, point_positions, point_targets = [], [], []
        for r, (_, task, prompt, target, regions) in enumerate(encoded):
            ids = prompt + target
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
            types[r, :len(prompt)] = 0
            for j, token in enumerate(target):
                loss_rows.append(r)
                loss_positions.append(len(prompt) + j - 1)
                targets.append(token)
                tasks.append(task)
            for j, region in self._points(task, target, regions):
                point_rows.append(r)
                point_positions.append(len(prompt) + j - 1)
                point_targets.append(region)
        patches = self.grid * self.grid
        return Rows(
            image_index=torch.tensor([i for i, _, _, _, _ in encoded]),
            input_ids=input_ids,
            attention_mask=attention,
            token_type_ids=types,
            loss_rows=torch.tensor(loss_rows),
            loss_positions=torch.tensor(loss_positions),
            targets=torch.tensor(targets),
            tasks=tasks,
            point_rows=torch.tensor(point_rows, dtype=torch.long),
            point_positions=torch.tensor(point_positions, dtype=torch.long),
            point_targets=torch.from_numpy(np.stack(point_targets)) if point_targets
            else torch.zeros((0, patches)),
        )
