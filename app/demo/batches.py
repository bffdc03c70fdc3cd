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
from app.demo.probe import ProbeTargets, targets
from app.demo.world import generate_scene, render, scene_rng
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
                 images: int, prompts: int, augment: bool = True) -> None:
        self.encoder = encoder
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
            rows += [(i, ex) for ex in examples(scene, self.prompts, rng, self.codes)]
        return replace(self.collate(torch.stack(pixels), rows), probe=probe)

    def images_only(self, step: int, count: int) -> tuple[torch.Tensor, list[ProbeTargets]]:
        """Images and probe targets of their own stream (the vision tower's warm-up, app.demo.train)."""
        pixels, probe = [], []
        for i in range(count):
            rng = scene_rng(VISION_STREAM, self.seed, step * count + i)
            scene = generate_scene(rng)
            image = as_sent(render(scene), rng) if self.augment else render(scene)
            pixels.append(self.transform(image))
            probe.append(targets(scene, self.grid))
        return torch.stack(pixels), probe

    def collate(self, pixel_values: torch.Tensor, rows: list[tuple[int, Example]],
                group_rows: int = 16) -> Batch:
        encoded = [(i, ex.task, self.encoder.encode(ex.prefix), self.target_ids(ex.target)) for i, ex in rows]
        encoded.sort(key=lambda row: len(row[2]) + len(row[3]))
        groups = [self._rows(encoded[s:s + group_rows]) for s in range(0, len(encoded), group_rows)]
        return Batch(pixel_values=pixel_values, groups=groups)

    def _rows(self, encoded: list[tuple[int, str, list[int], list[int]]]) -> Rows:
        length = max(len(p) + len(t) for _, _, p, t in encoded)
        count = len(encoded)
        input_ids = torch.full((count, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((count, length), dtype=torch.long)
        types = torch.ones((count, length), dtype=torch.long)
        loss_rows, loss_positions, targets, tasks = [], [], [], []
        for r, (_, task, prompt, target) in enumerate(encoded):
            ids = prompt + target
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
            types[r, :len(prompt)] = 0
            for j, token in enumerate(target):
                loss_rows.append(r)
                loss_positions.append(len(prompt) + j - 1)
                targets.append(token)
                tasks.append(task)
        return Rows(
            image_index=torch.tensor([i for i, _, _, _ in encoded]),
            input_ids=input_ids,
            attention_mask=attention,
            token_type_ids=types,
            loss_rows=torch.tensor(loss_rows),
            loss_positions=torch.tensor(loss_positions),
            targets=torch.tensor(targets),
            tasks=tasks,
        )
