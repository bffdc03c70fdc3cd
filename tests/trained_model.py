"""A tiny PaliGemma trained here, in seconds, to answer `detect`/`segment` with known boxes and masks.

Random weights almost never emit a well-formed detection, so the tests that need real boxes and mask
tokens from a real forward pass use this: the `tiny` preset, fine-tuned on a handful of targets until
greedy decoding reproduces them exactly, then saved with `save_pretrained` and served from that
directory through the ordinary checkpoint path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from app.model import presets
from app.model.inputs import ImageTransform, PromptEncoder

# Bins are (y_min, x_min, y_max, x_max) in 0..1023, as PaliGemma writes them.
DETECT_BINS = (256, 128, 767, 895)
SEGMENT_BINS = (100, 200, 900, 700)
SEGMENT_CODES = (3, 17, 42, 99, 5, 127, 0, 64, 12, 88, 31, 7, 120, 55, 9, 77)


def _loc(bins: tuple[int, ...]) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


@dataclass(frozen=True)
class Example:
    prefix: str
    target: str


EXAMPLES = (
    Example("detect red box", f"{_loc(DETECT_BINS)} red box ; {_loc((10, 20, 300, 400))} box"),
    Example(
        "segment red box",
        _loc(SEGMENT_BINS) + "".join(f"<seg{c:03d}>" for c in SEGMENT_CODES) + " red box",
    ),
    Example("caption en", "a red box on white"),
)


def training_image(width: int = 320, height: int = 200) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill="red")
    return image


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def target_loss(model: torch.nn.Module, prompt: list[int], target: list[int],
                pixels: torch.Tensor) -> torch.Tensor:
    """The loss of `target` after `prompt` (image tokens included) as PaliGemma trains: the prompt is the
    bidirectional prefix (token type 0) and is not scored."""
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    token_type_ids = torch.tensor([[0] * len(prompt) + [1] * len(target)])
    return model(input_ids=ids, pixel_values=pixels, labels=labels, token_type_ids=token_type_ids).loss


def fit(model: torch.nn.Module, rows: list[tuple[list[int], list[int], torch.Tensor]], steps: int, lr: float,
        stop_below: float = 0.0) -> None:
    """Adam on the summed `target_loss` of (prompt, target, pixels) rows, over the trainable parameters,
    for `steps` steps or until the loss falls below `stop_below`; the model is left in eval mode.

    In one torch thread: a tiny model's ops are too small for a team of threads to gain anything, and on a
    shared machine each op of a two-thread team waits for whichever thread is descheduled (measured with
    another process busy: 0.09 s a step in one thread, 3.7 s in two)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.zeros(())
            for prompt, target, pixels in rows:
                loss = loss + target_loss(model, prompt, target, pixels)
            loss.backward()
            optimizer.step()
            if loss.item() < stop_below:
                break
    finally:
        torch.set_num_threads(threads)
        model.eval()


def train(directory: Path, steps: int = 300, seed: int = 0) -> Path:
    """Fine-tune the tiny preset on EXAMPLES, check it learned them, save it, return the directory."""
    preset = presets.PRESETS["tiny"]
    processor = presets.build_processor(preset)
    torch.manual_seed(seed)
    model = presets.build_model(preset, processor)
    encoder = PromptEncoder.from_processor(processor)
    pixels = ImageTransform.from_processor(processor)(training_image()).unsqueeze(0)
    tokenizer = processor.tokenizer

    rows = []
    for example in EXAMPLES:
        prompt = encoder.encode(example.prefix)
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))

    fit(model, [(prompt, target, pixels) for prompt, target in rows], steps, lr=1e-2, stop_below=1e-3)
    with torch.inference_mode():
        for (prompt, _), example in zip(rows, EXAMPLES, strict=True):
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 token_type_ids=torch.zeros_like(ids), pixel_values=pixels,
                                 max_new_tokens=64, do_sample=False)
            text = encoder.decode(out[0, len(prompt):].tolist())
            if text != example.target:
                raise AssertionError(f"training did not converge: {example.prefix!r} -> {text!r}")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
