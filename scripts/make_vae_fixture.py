"""Make tests/fixtures/vae_reference.npz: big_vision's Flax mask decoder (and placement) on seeded weights.

Needs JAX, Flax and Pillow, which the project does not depend on, so run it from a throwaway venv:

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib flax numpy pillow
    cd /work/main && JAX_PLATFORMS=cpu /tmp/jaxenv/bin/python scripts/make_vae_fixture.py

The weights (~4.8 MB of decoder) are not stored: `tests/unit/masks/vae_fixture_weights.py` regenerates them
from the seed, and the fixture keeps the seed, the weights' sha256, the code indices and the reference
outputs.
The project's tests read the fixture with numpy only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # big_vision runs the decoder on the CPU backend too

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL
import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "vae_reference.npz"
BIG_VISION_COMMIT = "0127fb6b337ee2a27bf4e54dea79cff176527356"


def _load_weights_helper():
    path = ROOT / "tests" / "unit" / "masks" / "vae_fixture_weights.py"
    spec = importlib.util.spec_from_file_location("vae_fixture_weights", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# REFERENCE DEFINITION, transcribed from google-research/big_vision at commit 0127fb6b (2025-05-19),
# big_vision/evaluators/proj/paligemma/transfers/segmentation.py: `_get_params`,
# `_quantized_values_from_codebook_indices`, `ResBlock`, `Decoder`, and `get_reconstruct_masks`'s
# `reconstruct_masks` (minus the gfile loading). Only used to generate the fixture.
# ---------------------------------------------------------------------------------------------------------
def _get_params(checkpoint):
    """Converts PyTorch checkpoint to Flax params."""

    def transp(kernel):
        return np.transpose(kernel, (2, 3, 1, 0))

    def conv(name):
        return {
            "bias": checkpoint[name + ".bias"],
            "kernel": transp(checkpoint[name + ".weight"]),
        }

    def resblock(name):
        return {
            "Conv_0": conv(name + ".0"),
            "Conv_1": conv(name + ".2"),
            "Conv_2": conv(name + ".4"),
        }

    return {
        "_embeddings": checkpoint["_vq_vae._embedding"],
        "Conv_0": conv("decoder.0"),
        "ResBlock_0": resblock("decoder.2.net"),
        "ResBlock_1": resblock("decoder.3.net"),
        "ConvTranspose_0": conv("decoder.4"),
        "ConvTranspose_1": conv("decoder.6"),
        "ConvTranspose_2": conv("decoder.8"),
        "ConvTranspose_3": conv("decoder.10"),
        "Conv_1": conv("decoder.12"),
    }


def _quantized_values_from_codebook_indices(codebook_indices, embeddings):
    batch_size, num_tokens = codebook_indices.shape
    assert num_tokens == 16, codebook_indices.shape
    _unused_num_embeddings, embedding_dim = embeddings.shape  # (renamed for the linter)

    encodings = jnp.take(embeddings, codebook_indices.reshape(-1), axis=0)
    encodings = encodings.reshape((batch_size, 4, 4, embedding_dim))
    return encodings


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        original_x = x
        x = nn.Conv(features=self.features, kernel_size=(3, 3), padding=1)(x)
        x = nn.relu(x)
        x = nn.Conv(features=self.features, kernel_size=(3, 3), padding=1)(x)
        x = nn.relu(x)
        x = nn.Conv(features=self.features, kernel_size=(1, 1), padding=0)(x)
        return x + original_x


class Decoder(nn.Module):
    """Upscales quantized vectors to mask."""

    @nn.compact
    def __call__(self, x):
        num_res_blocks = 2
        dim = 128
        num_upsample_layers = 4

        x = nn.Conv(features=dim, kernel_size=(1, 1), padding=0)(x)
        x = nn.relu(x)

        for _ in range(num_res_blocks):
            x = ResBlock(features=dim)(x)

        for _ in range(num_upsample_layers):
            x = nn.ConvTranspose(
                features=dim,
                kernel_size=(4, 4),
                strides=(2, 2),
                padding=2,
                transpose_kernel=True,
            )(x)
            x = nn.relu(x)
            dim //= 2

        x = nn.Conv(features=1, kernel_size=(1, 1), padding=0)(x)

        return x


def make_reconstruct_masks(checkpoint):
    params = _get_params(checkpoint)

    def reconstruct_masks(codebook_indices):
        quantized = _quantized_values_from_codebook_indices(codebook_indices, params["_embeddings"])
        return Decoder().apply({"params": params}, quantized)

    return jax.jit(reconstruct_masks)


def reference_place(m64, tokens, h, w):
    """REFERENCE: the evaluator's `Evaluator.run` placement (same file), with the paste into a full-image
    mask that its IoU computation (`gtm[y1:y2, x1:x2] & mi`) implies."""
    y1, x1, y2, x2 = np.asarray(tokens) / 1023  # Back to [0.0 ... 1.0]
    y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))
    full = np.zeros((h, w), bool)
    if x2 <= x1 or y2 <= y1:  # Can still happen after int().
        return full
    mi = np.asarray(
        PIL.Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=PIL.Image.BILINEAR)
    )
    full[y1:y2, x1:x2] = mi > 0.0
    return full
# ----------------------------------------- end of reference definition -----------------------------------


# (mask index, loc bins y1 x1 y2 x2, image height, image width): non-square images, a box touching every
# border, a box smaller than 64 px (Pillow then filters with a widened, antialiasing triangle) and a
# 7 px wide sliver at the right edge.
PLACEMENTS = (
    (0, (100, 200, 900, 700), 360, 640),
    (1, (0, 0, 1023, 1023), 900, 300),
    (2, (500, 500, 560, 540), 360, 640),
    (3, (10, 1000, 1020, 1023), 900, 300),
)


def main() -> None:
    helper = _load_weights_helper()
    weights = helper.random_vae_weights(helper.FIXTURE_SEED)
    rng = np.random.default_rng(helper.FIXTURE_SEED + 1)
    indices = np.concatenate([
        np.zeros((1, 16), np.int32),  # the extremes of the codebook
        np.full((1, 16), 127, np.int32),
        np.arange(16, dtype=np.int32)[None] * 8,
        rng.integers(0, 128, size=(5, 16), dtype=np.int32),
    ])
    masks = np.asarray(jax.device_get(make_reconstruct_masks(weights)(jnp.asarray(indices))))[..., 0]
    assert masks.shape == (len(indices), 64, 64) and masks.dtype == np.float32, (masks.shape, masks.dtype)

    fixture = {
        "seed": np.int64(helper.FIXTURE_SEED),
        "weights_sha256": np.str_(helper.weights_sha256(weights)),
        "indices": indices,
        "masks": masks,
        "place_spec": np.array([(i, *tok, h, w) for i, tok, h, w in PLACEMENTS], np.int32),
        "versions": np.str_(
            f"big_vision {BIG_VISION_COMMIT}; jax {jax.__version__}; flax {flax.__version__}; "
            f"numpy {np.__version__}; pillow {PIL.__version__}"
        ),
    }
    for k, (i, tokens, h, w) in enumerate(PLACEMENTS):
        placed = reference_place(masks[i], tokens, h, w)
        fixture[f"placed_{k}"] = np.packbits(placed, axis=None)
        print(f"placed_{k}: {h}x{w}, {int(placed.sum())} pixels on")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **fixture)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes); masks in [{masks.min():.3f}, {masks.max():.3f}], "
          f"{(masks > 0).mean():.0%} positive")


if __name__ == "__main__":
    sys.exit(main())
