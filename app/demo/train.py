"""Train the demo model and its mask decoder from a seed: `python -m app.demo.train` (`make demo-model`).

1. The mask VQ-VAE (`mask_vqvae`) on every object mask of the world, saved as `vae-demo.npz`; the
   model's `<seg>` targets are then read back from that saved file, the one the server decodes with.
2. The PaliGemma: the real `PaliGemmaForConditionalGeneration`, its config and processor built as the
   presets' are (byte-level tokenizer with Gemma's special, loc and seg tokens), trained on every task.
   - Each step draws `images` scenes and `prompts` prompts per scene; the vision tower runs once per
     scene and its features serve all the scene's prompts (`mm_encoder_outputs`).
   - Loc tokens are 1024 ordered bins, so their targets are soft: a Gaussian of `loc_sigma` bins around
     the true bin (a neighbour bin is almost right, a far one wrong), and their embeddings start as a
     smooth sinusoidal code of the bin so that neighbours start out alike.
   - Two training-only targets beside the answers' tokens (neither is part of the checkpoint): a probe
     asks every image token what its patch holds (`probe`), and `pointing` asks one attention head of the
     language model to look, wherever the answer writes an object's box or mask (or reads the word), at
     that object's image tokens (docs/demo.md, "An attention target, tried"). The probe also asks each
     object's patches for its box, at a tenth of its weight while the tower trains alone (docs/demo.md,
     "Where the box target's cost is paid"). To read, it asks each inked patch for its main letter and the
     mean of the word's tokens for the word, and the tower's own phase draws a word into every scene
     (docs/demo.md, "A tower that reads").
   - AdamW, linear warm-up then cosine decay, gradient clipping. The seed fixes the batches and the
     initial weights; a process of its own draws them ahead of the step (`made_ahead`), the same either
     way. On one torch thread (the default) a rerun is the same bit for bit; on two the CPU kernels may
     add in another order from run to run (the mask VQ-VAE's loss differed between two runs of the same
     seed within 100 steps), and scores may differ (docs/demo.md, "How it was made").
3. `save_pretrained` (safetensors, model + processor) into the output directory with the decoder beside it.
4. With `polish_steps`: that checkpoint read back and trained further (`polish_model`): a fresh AdamW, a
   short warm-up and cosine decay again, on scenes the main phase never drew, without the vision probe
   (whose heads the checkpoint does not hold), then saved over it. Starting from what was read back, the
   phase trains the same weights whether it runs at the end of the run or later on a saved checkpoint
   (`--polish-from`), so a recipe's polish can be tried on one main phase without rerunning it.

The run logs every task's loss, and a quick held-out evaluation now and then (`evaluate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting for each other lose their time slices and
# a step takes several times longer; passive waiting costs nothing on an idle one. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from app.demo import MASK_DECODER_FILE, WEIGHTS_DIR
from app.demo.batches import Batch, BatchMaker
from app.demo.examples import TASK_WEIGHTS, format_task_weights, parse_task_weights
from app.demo.made_ahead import made_ahead
from app.demo.mask_vqvae import MaskTokenizer, save_npz, train_mask_vqvae
from app.demo.pointing import AttentionPointer
from app.demo.probe import VisionProbe, add_capped_gradient
from app.model import presets
from app.model.inputs import ImageTransform, PromptEncoder
from app.model.presets import loc_ids

logger = logging.getLogger("app.demo.train")

# Layouts tried; `demo` is the one shipped (docs/demo.md says how they compared).
ARCHITECTURES = {
    # 224 px in 28 px patches: 64 image tokens, like 112 px / 14, but the patches see every pixel.
    "demo": presets.Preset("demo", "PaliGemma trained on the demo world", 224, 28, 128, 4, 4, 512, 128, 4,
                           4, 1, 32, 512, varied_outputs=False),
    "demo-112": presets.Preset("demo-112", "112 px / patch 14", 112, 14, 128, 4, 4, 512, 128, 4, 4, 1, 32,
                               512, varied_outputs=False),
    "demo-wide": presets.Preset("demo-wide", "224 px / 28, 6 x 192", 224, 28, 192, 6, 4, 768, 192, 6, 4, 1,
                                48, 768, varied_outputs=False),
    "demo-v6": presets.Preset("demo-v6", "224 px / 28, vision 6 x 192, text 4 x 128", 224, 28, 192, 6, 6,
                              768, 128, 4, 4, 1, 32, 512, varied_outputs=False),
    "demo-56": presets.Preset("demo-56", "224 px / 56: 16 image tokens", 224, 56, 192, 4, 6, 768, 128, 4,
                              4, 1, 32, 512, varied_outputs=False),
    "demo-32": presets.Preset("demo-32", "224 px / 32: 49 image tokens", 224, 32, 128, 4, 4, 512, 128, 4,
                              4, 1, 32, 512, varied_outputs=False),
    "demo-16": presets.Preset("demo-16", "224 px / 16", 224, 16, 128, 4, 4, 512, 128, 4, 4, 1, 32, 512,
                              varied_outputs=False),
}


ATTENTIONS = ("sdpa", "eager")  # transformers' implementations that train on a CPU
# TrainConfig's fields that have a floor: below it a value would not fail, it would train silently without
# what it names (`vision_probe_box_weight` < 0 means something: the same as `probe_box_weight`).
_AT_LEAST_ONE = ("images", "prompts", "threads", "vision_images")
_AT_LEAST_ZERO = ("steps", "lr", "warmup", "weight_decay", "clip", "vq_steps", "batch_workers", "eval_every",
                  "eval_scenes", "probe_weight", "probe_box_weight", "vision_box_step",
                  "vision_box_weight_after", "probe_box_drop_step", "probe_box_weight_after",
                  "probe_box_share", "pointing_weight", "vision_steps", "single_object_steps",
                  "polish_steps", "polish_lr", "polish_warmup")


@dataclass(frozen=True)
class TrainConfig:
    # The shipped weights' seed: of three seeds of an earlier recipe it met the most targets (docs/demo.md,
    # "OCR at 0.2, three seeds"); on one thread a seed gives the same weights bit for bit.
    # The shipped recipe is these defaults (docs/demo.md, "A polish phase").
    seed: int = 1
    architecture: str = "demo"
    steps: int = 4800
    images: int = 8  # scenes per step
    prompts: int = 6  # prompts per scene
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    # The probe's own parameters clipped on their own: its box head's gradient can be many times the
    # model's, and clipped together it would shrink every step of the model's with it.
    clip_probe_apart: bool = False
    loc_sigma: float = 4.0  # bins (one pixel of the 224 px canvas is ~4.6 bins)
    loc_peak: float = 0.5  # share of a loc target on the true bin (see Objective)
    vq_steps: int = 400
    # One thread, as the shipped weights were trained (each run on a core of its own; docs/demo.md): a
    # rerun is then the same bit for bit. Two ran short runs faster and repeatably, but a real run no faster
    # than one (docs/demo.md, "A longer tower phase"); they give other weights than one.
    threads: int = 1
    # Processes that draw the batches ahead of the step (app.demo.made_ahead; 0: the training process
    # draws them): the same batches, so the same weights, either way.
    batch_workers: int = 1
    eval_every: int = 400
    eval_scenes: int = 12
    weights_dtype: str = "float16"
    autocast: bool = True  # bfloat16 matmuls (see batch_logits)
    # The attention implementation training runs ("sdpa" or "eager"; the checkpoint does not record it, so
    # serving chooses its own). At these lengths (64 image tokens, prompts of ~100 tokens, heads 32 wide)
    # torch's CPU flash-attention backward is a third of a whole-model step; eager attention (matmuls and a
    # softmax) takes a quarter off every step (docs/demo.md, "Eager attention in training"), and buys the
    # recipe its 4800 whole-model steps.
    attention: str = "eager"
    probe_weight: float = 1.0  # the vision probe's loss (app.demo.probe) beside the model's
    probe_box_weight: float = 1.0  # the probe also asks every patch of an object for its box (0: off)
    # Its weight while the tower trains alone (< 0: the same). A tenth there: at full weight the tower's
    # first steps lay the image tokens out so that VQA and captions learn slowly ever after (docs/demo.md).
    vision_probe_box_weight: float = 0.1
    # From this step of the tower phase on, the box term weighs `vision_box_weight_after` (0: never): a long
    # tower phase at a tenth of it loses boxes (docs/demo.md), and late its layout of the tokens is set.
    vision_box_step: int = 3000
    vision_box_weight_after: float = 1.0
    probe_box_drop_step: int = 0  # from this step of the whole model on, it weighs the next (0: never)
    probe_box_weight_after: float = 0.0
    # The box term's gradient at the image tokens at most this share of the rest's there (0: uncapped;
    # app.demo.probe.add_capped_gradient says why).
    probe_box_share: float = 0.0
    probe_words: bool = False  # and every patch of the word which word it is
    # Reading (docs/demo.md, "A tower that reads"): each inked patch which letter has most ink in it, and
    # the mean of the word's tokens which word it is.
    probe_letters: bool = True
    probe_word_mean: bool = True
    pointing_weight: float = 0.5  # the attention target of app.demo.pointing (0: off)
    pointing_layer: int = -2  # the language model layer whose first head it trains
    point_vqa: bool = False  # it also points a VQA answer about one object at that object
    vision_steps: int = 4000  # the vision tower alone on the probe first (0.18 s a step here, eager)
    single_object_steps: int = 0  # scenes of one object only at first
    vision_images: int = 32
    # The share of the tower phase's scenes that hold a word (the world's is 0.5): reading is what that
    # phase learns slowest (docs/demo.md), and the objects come with every scene either way.
    vision_word_probability: float = 1.0
    # The mixture of tasks among a scene's prompts, `task=weight,...` (relative weights)
    task_weights: str = format_task_weights(TASK_WEIGHTS)
    # OCR's weight on a scene without a word, as a share of its weight in the mixture: the empty answer
    # is learnt early, and reading is what the language model learns slowest.
    ocr_wordless_weight: float = 1.0
    # After the main phase (whose learning rate has decayed to 0): this many more whole-model steps from
    # the saved checkpoint, warm-up to `polish_lr` and cosine decay again (`polish_model`; 0: none), with
    # this mixture of tasks (empty: `task_weights`). OCR's weight doubled there: on the main mixture a
    # polish finds more objects and reads fewer words; with more reading it does both (docs/demo.md, "A
    # polish phase").
    polish_steps: int = 600
    polish_lr: float = 2e-4
    polish_warmup: int = 50
    polish_task_weights: str = format_task_weights({**TASK_WEIGHTS, "ocr": 0.4})

    def __post_init__(self) -> None:
        _ = self.mixture  # a bad mixture fails here, not after the tower's phase
        if self.polish_task_weights:
            parse_task_weights(self.polish_task_weights)
        share = self.vision_word_probability
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"vision_word_probability must be within [0, 1], not {share}")
        if not 0.0 < self.ocr_wordless_weight <= 1.0:  # above 0: a mixture of OCR alone stays drawable
            raise ValueError(f"ocr_wordless_weight must be within (0, 1], not {self.ocr_wordless_weight}")
        for floor, names in ((1, _AT_LEAST_ONE), (0, _AT_LEAST_ZERO)):
            for name in names:
                if getattr(self, name) < floor:
                    raise ValueError(f"{name} must be {floor} or more, not {getattr(self, name)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        if not self.loc_sigma > 0.0 or not 0.0 <= self.loc_peak <= 1.0:
            raise ValueError(f"loc_sigma must be above 0 and loc_peak within [0, 1], not {self.loc_sigma}, "
                             f"{self.loc_peak}")

    @property
    def mixture(self) -> dict[str, float]:
        """`task_weights` read: relative weight per task."""
        return parse_task_weights(self.task_weights)

    @property
    def vision_box_weight(self) -> float:
        """The box term's weight while the vision tower trains alone."""
        return self.probe_box_weight if self.vision_probe_box_weight < 0 else self.vision_probe_box_weight


def build(architecture: str, seed: int, attention: str = TrainConfig.attention,
          ) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    preset = ARCHITECTURES[architecture]
    processor = presets.build_processor(preset)
    torch.manual_seed(seed)
    model = presets.build_model(preset, processor)
    model.set_attn_implementation(attention)  # the tower's and the language model's
    _smooth_loc_embeddings(model, loc_ids(processor)[0])
    return model, processor


def _smooth_loc_embeddings(model: PaliGemmaForConditionalGeneration, first: int) -> None:
    """Sinusoids of the bin index, periods from 8 to 4096 bins, at the scale of the other embeddings."""
    layer = model.get_input_embeddings()
    assert isinstance(layer, torch.nn.Embedding)
    embeddings = layer.weight
    width = embeddings.shape[1]
    bins = torch.arange(len(presets.LOC_TOKENS), dtype=torch.float32)[:, None]
    periods = 4096.0 * (8.0 / 4096.0) ** (torch.arange(width // 2, dtype=torch.float32) / (width // 2 - 1))
    angles = 2 * math.pi * bins / periods
    code = torch.cat([angles.sin(), angles.cos()], dim=1) * embeddings.std().item() * math.sqrt(2)
    with torch.no_grad():
        embeddings[first:first + len(presets.LOC_TOKENS)] = code.to(embeddings.dtype)


class Objective:
    """Cross-entropy on every target token; for a loc token, against a target that puts `loc_peak` on the
    true bin and the rest on a Gaussian of `sigma` bins around it.

    The Gaussian part tells the model that a neighbouring bin is almost right (a box learns from every
    near miss); the peak keeps the true bin's probability high, because serving decodes greedily and the
    first loc token of an answer competes with `<eos>` (an empty answer): a flat spread over bins would
    lose to it even when an object is certainly there.
    """

    def __init__(self, loc_range: tuple[int, int], sigma: float, peak: float) -> None:
        self.first, self.end = loc_range
        offsets = torch.arange(self.end - self.first, dtype=torch.float32)
        kernel = torch.exp(-0.5 * ((offsets[None, :] - offsets[:, None]) / sigma) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        self.kernel = peak * torch.eye(len(offsets)) + (1 - peak) * kernel  # row b: the target for bin b

    def is_loc(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets >= self.first) & (targets < self.end)

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        losses = -log_probs.gather(1, targets[:, None])[:, 0]
        is_loc = self.is_loc(targets)
        if bool(is_loc.any()):
            soft = self.kernel[targets[is_loc] - self.first]
            losses = losses.clone()
            losses[is_loc] = -(soft * log_probs[is_loc, self.first:self.end]).sum(dim=1)
        return losses


def batch_logits(model: PaliGemmaForConditionalGeneration, batch: Batch, autocast: bool = True,
                 pointer: AttentionPointer | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the loss positions of every group, in `batch.targets` order, the image features the
    language model reads (for the probe), and the pointing loss (app.demo.pointing) when a pointer is
    given, by trained position; the vision tower runs once per image for all its rows. Matmuls in bfloat16
    under autocast (2.5x faster on CPUs with AVX512-BF16), the logits and the losses in float32."""
    pointing, points = torch.zeros(()), 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        vision = model.model.get_image_features(batch.pixel_values)
        image_tokens = vision.pooler_output.shape[1]
        hidden = []
        for call, rows in enumerate(batch.groups):
            image = BaseModelOutputWithPooling(pooler_output=vision.pooler_output[rows.image_index])
            states = model.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                                 token_type_ids=rows.token_type_ids, mm_encoder_outputs={"image": image},
                                 use_cache=False).last_hidden_state
            hidden.append(states[rows.loss_rows, rows.loss_positions])
            if pointer is not None and len(rows.point_rows):
                pointing = pointing + pointer.loss(call, rows.point_rows, rows.point_positions, image_tokens,
                                                   rows.point_targets)
                points += len(rows.point_rows)
    if pointer is not None:
        pointer.inputs.clear()
    return model.lm_head(torch.cat(hidden).float()), vision.pooler_output, pointing / max(points, 1)


def _pretrain_vision(model: PaliGemmaForConditionalGeneration, probe: VisionProbe, maker: BatchMaker,
                     config: TrainConfig) -> None:
    """The vision tower and projector alone, on the probe, before the language model joins: its image
    tokens then already say what is where (app.demo.probe says why)."""
    if not config.vision_steps:
        return
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    started = time.perf_counter()
    read, words = 0, 0  # since the last log line
    scenes = made_ahead(lambda step: maker.images_only(step, config.vision_images,
                                                       config.vision_word_probability),
                        config.vision_steps, config.batch_workers)
    for step, (pixels, probe_targets) in enumerate(scenes):
        if config.vision_box_step and step == config.vision_box_step:
            probe.box_weight = config.vision_box_weight_after
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 50) * (1 - step / config.vision_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast):
            features = model.model.get_image_features(pixels).pooler_output
        loss = probe.loss(features, probe_targets)
        right, count = probe.words_read(features, probe_targets)  # before this step learns from them
        read, words = read + right, words + count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        if (step + 1) % 50 == 0:
            reading = f", words read {read / words:.2f} of {words}" if words else ""  # 0: no word-mean head
            logger.info("vision step %d/%d probe loss %.4f%s, %.0f s", step + 1, config.vision_steps,
                        loss.item(), reading, time.perf_counter() - started)
            read, words = 0, 0


def clip_gradients(model: nn.Module, probe: nn.Module | None, clip: float, probe_apart: bool) -> float:
    """Clips the gradients to norm `clip`, the probe's (if any) with the model's or on their own; returns
    the norm before clipping of what was clipped with the model."""
    if probe is None:
        return float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip))
    if probe_apart:
        torch.nn.utils.clip_grad_norm_(list(probe.parameters()), clip)
        return float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip))
    return float(torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], clip))


def _cosine(peak: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _learning_rate(config: TrainConfig, step: int) -> float:
    return _cosine(config.lr, config.warmup, config.steps, step)


def _adamw(named: list[tuple[str, nn.Parameter]], config: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on embeddings, norms or biases)."""
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train_model(config: TrainConfig, codes: MaskTokenizer, evaluate_every=None,
                ) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor, list[float]]:
    """The training loop; returns the model, its processor and the loss of every step."""
    model, processor = build(config.architecture, config.seed, config.attention)
    maker = _batch_maker(config, processor, codes)
    probe = VisionProbe(model.config.text_config.hidden_size,  # type: ignore[union-attr]
                        max(config.vision_box_weight, config.probe_box_weight, config.probe_box_weight_after,
                            config.vision_box_weight_after if config.vision_box_step else 0.0),
                        config.probe_words, config.probe_letters, config.probe_word_mean)
    probe.box_weight = config.vision_box_weight
    _pretrain_vision(model, probe, maker, config)
    probe.box_weight = config.probe_box_weight
    optimizer = _adamw([*model.named_parameters(), *probe.named_parameters()], config, config.lr)
    losses = _whole_model_steps(model, processor, maker, optimizer, config, _Phase(
        "step", config.steps, 0, lambda step: _learning_rate(config, step)), probe, evaluate_every)
    return model, processor, losses


@dataclass(frozen=True)
class _Phase:
    """A stretch of whole-model steps: its name in the log, its length, the index of the batch it starts
    at (a later phase draws scenes the earlier never saw) and its learning rate by step."""
    name: str
    steps: int
    first_batch: int
    learning_rate: Callable[[int], float]


def _batch_maker(config: TrainConfig, processor: PaliGemmaProcessor, codes: MaskTokenizer,
                 task_weights: str = "") -> BatchMaker:
    return BatchMaker(PromptEncoder.from_processor(processor), ImageTransform.from_processor(processor),
                      codes, config.seed, config.images, config.prompts, point_vqa=config.point_vqa,
                      task_weights=parse_task_weights(task_weights) if task_weights else config.mixture,
                      wordless_ocr=config.ocr_wordless_weight)


def _whole_model_steps(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor,
                       maker: BatchMaker, optimizer: torch.optim.Optimizer, config: TrainConfig,
                       phase: _Phase, probe: VisionProbe | None = None, evaluate_every=None) -> list[float]:
    """`phase.steps` steps of the whole model on the answers' tokens, the pointing target and (when given)
    the vision probe; returns the loss of every step and leaves the model in eval mode."""
    objective = Objective(loc_ids(processor), config.loc_sigma, config.loc_peak)
    pointer = AttentionPointer(model, config.pointing_layer) if config.pointing_weight else None
    probe_weight = config.probe_weight if probe is not None else 0.0
    model.train()
    losses: list[float] = []
    window: dict[str, list[float]] = defaultdict(list)
    loc_errors: list[float] = []  # mean distance in bins of the argmax from the true bin
    probe_losses: list[float] = []
    pointing_losses: list[float] = []
    # Before clipping: when one term's gradient dwarfs the others', it alone steers the parameters it
    # reaches (Adam scales each parameter's step by its own gradient's size), so the log shows it.
    grad_norms: list[float] = []
    box_shares: list[float] = []  # the box term's gradient norm at the image tokens over the rest's, uncapped
    started = time.perf_counter()
    first = phase.first_batch
    batches = made_ahead(lambda step: maker.batch(first + step,
                                                  1 if first + step < config.single_object_steps else 3),
                         phase.steps, config.batch_workers)
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = phase.learning_rate(step)
        logits, patches, pointing_loss = batch_logits(model, batch, config.autocast, pointer)
        token_losses = objective.token_losses(logits, batch.targets)
        if probe is not None and config.probe_box_drop_step and step == config.probe_box_drop_step:
            probe.box_weight = config.probe_box_weight_after
        optimizer.zero_grad(set_to_none=True)
        capped = (probe is not None and config.probe_box_share > 0 and probe.box is not None
                  and probe_weight > 0)
        if capped:
            assert probe is not None
            # Its own backward first, from a copy of the tokens: the probe's box head learns from it as is,
            # and what it asks of the tokens joins the rest's gradient there, capped, in the main backward.
            loose = patches.detach().float().requires_grad_()
            box_loss = probe_weight * probe.box_loss(loose, batch.probe)
            box_loss.backward()
            assert loose.grad is not None
            add_capped_gradient(patches, loose.grad, config.probe_box_share, box_shares)
        probe_loss = (probe.loss(patches, batch.probe, box=not capped) if probe is not None and probe_weight
                      else torch.zeros(()))
        loss = token_losses.mean() + probe_weight * probe_loss + config.pointing_weight * pointing_loss
        if capped:
            probe_loss = probe_loss + box_loss.detach() / probe_weight
        is_loc = objective.is_loc(batch.targets)
        if bool(is_loc.any()):
            guessed = logits[is_loc, objective.first:objective.end].argmax(-1)
            truth = batch.targets[is_loc] - objective.first
            loc_errors.append(float((guessed - truth).abs().float().mean()))
        loss.backward()
        grad_norms.append(clip_gradients(model, probe, config.clip, config.clip_probe_apart))
        optimizer.step()
        losses.append(token_losses.mean().item())
        probe_losses.append(probe_loss.item())
        pointing_losses.append(pointing_loss.item())
        for task, value in zip(batch.tasks, token_losses.detach().tolist(), strict=True):
            window[task].append(value)
        if (step + 1) % 50 == 0 or step + 1 == phase.steps:
            per_task = " ".join(f"{t} {np.mean(v):.3f}" for t, v in sorted(window.items()))
            elapsed = time.perf_counter() - started
            shares = f", box/rest gradient {np.mean(box_shares[-50:]):.2f}" if box_shares else ""
            logger.info("%s %d/%d loss %.4f (%s) loc error %.1f bins, probe %.3f, pointing %.3f, "
                        "grad norm %.1f%s, lr %.2e, %.0f s, %.2f s/step", phase.name, step + 1, phase.steps,
                        np.mean(losses[-50:]), per_task, np.mean(loc_errors[-50:]),
                        np.mean(probe_losses[-50:]), np.mean(pointing_losses[-50:]),
                        np.mean(grad_norms[-50:]), shares,
                        optimizer.param_groups[0]["lr"], elapsed, elapsed / (step + 1))
            window.clear()
        if evaluate_every is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            model.eval()
            evaluate_every(model, processor, step + 1)
            model.train()
    if pointer is not None:
        pointer.remove()
    model.eval()
    return losses


def load_for_training(directory: Path, attention: str,
                      ) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A saved checkpoint in float32, to train on: the same model whether it was just saved by this
    process or by an earlier one (saving rounds the weights to `weights_dtype`, and every buffer with them,
    so the polish phase always starts from what was read back)."""
    model = PaliGemmaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    model.set_attn_implementation(attention)
    return model, PaliGemmaProcessor.from_pretrained(directory)


def polish_model(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor,
                 config: TrainConfig, codes: MaskTokenizer) -> list[float]:
    """`polish_steps` more steps of the whole model, after the main phase's cosine has reached 0: a fresh
    AdamW, warm-up to `polish_lr` and cosine decay again, on scenes the main phase never drew, with the
    answers' tokens and the pointing target (the vision probe's heads are not saved with the checkpoint, so
    it is left out: the phase is then the same from a checkpoint on disk as at the end of a run)."""
    maker = _batch_maker(config, processor, codes, config.polish_task_weights)
    optimizer = _adamw(list(model.named_parameters()), config, config.polish_lr)
    phase = _Phase("polish step", config.polish_steps, config.steps,
                   lambda step: _cosine(config.polish_lr, config.polish_warmup, config.polish_steps, step))
    return _whole_model_steps(model, processor, maker, optimizer, config, phase)


def save_checkpoint(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor,
                    directory: Path, dtype: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    model.to(torch.float32)  # type: ignore[arg-type]
    processor.save_pretrained(directory)


def run(config: TrainConfig, out: Path, mask_vqvae: Path | None = None,
        polish_from: Path | None = None) -> dict[str, object]:
    """Both trainings into `out`; `mask_vqvae` reuses a trained mask VQ-VAE instead (for experiments), and
    `polish_from` skips the main phase and polishes that checkpoint (a run's own main phase saved there)."""
    if polish_from is not None and not config.polish_steps:
        raise ValueError("polishing a checkpoint needs polish_steps above 0")
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    npz = out / MASK_DECODER_FILE
    if mask_vqvae is None:
        save_npz(train_mask_vqvae(config.seed, config.vq_steps), npz, np.dtype(config.weights_dtype))
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mask_vqvae, npz)
    vq_seconds = time.perf_counter() - started
    codes = MaskTokenizer(npz)

    from app.demo import evaluate

    def quick_eval(model, processor, step):
        scores = evaluate.in_process(model, processor, npz, seed=config.seed + 10_000,
                                     count=config.eval_scenes)
        logger.info("eval at step %d: %s", step, json.dumps(scores))

    record: dict[str, object] = {"config": asdict(config), "mask_vqvae_seconds": round(vq_seconds, 1)}
    if polish_from is None:
        model, processor, losses = train_model(config, codes, quick_eval)
        save_checkpoint(model, processor, out, config.weights_dtype)
        polish_from = out
        record["main_seconds"] = round(time.perf_counter() - started - vq_seconds, 1)
    else:
        record["polished_from"] = str(polish_from)
    if config.polish_steps:
        polish_started = time.perf_counter()
        model, processor = load_for_training(polish_from, config.attention)
        # The polish changes weights only: its checkpoint keeps the main phase's config and processor files
        # byte for byte (a checkpoint read back writes loading details into them when saved again).
        kept = {path.name: path.read_bytes() for path in polish_from.glob("*.json")
                if path.name != "training.json"}
        losses = polish_model(model, processor, config, codes)
        save_checkpoint(model, processor, out, config.weights_dtype)
        for name, data in kept.items():
            (out / name).write_bytes(data)
        record["polish_seconds"] = round(time.perf_counter() - polish_started, 1)
    total = time.perf_counter() - started
    record.update({"total_seconds": round(total, 1), "final_loss": float(np.mean(losses[-50:]))})
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained in %.1f min: %s", total / 60, out)
    return record


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, Path | None, Path | None]:
    """(config, checkpoint directory, mask VQ-VAE to reuse, checkpoint to polish) from the command line:
    a flag per field."""
    parser = argparse.ArgumentParser(prog="python -m app.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--mask-vqvae", type=Path, help="reuse this trained mask VQ-VAE (.npz) instead")
    parser.add_argument("--polish-from", type=Path,
                        help="skip the main phase: polish this checkpoint (its config's --polish-steps)")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # --autocast / --no-autocast: type=bool would read "False" as true
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    try:
        config = replace(defaults, **{k: getattr(args, k) for k in asdict(defaults)})
    except ValueError as error:
        parser.error(str(error))
    if args.polish_from is not None and not config.polish_steps:
        parser.error("--polish-from needs --polish-steps above 0")
    return config, args.out, args.mask_vqvae, args.polish_from


def main(argv: list[str] | None = None) -> None:
    config, out, mask_vqvae, polish_from = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    run(config, out, mask_vqvae, polish_from)


if __name__ == "__main__":
    main()
