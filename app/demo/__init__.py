"""The built-in `demo` model: a small PaliGemma trained here on generated scenes of coloured shapes.

`world` draws the scenes, `answers` says what the model answers about them, `export` writes held-out
datasets, `mask_vqvae` trains the mask decoder, `train` trains the model (`make demo-model`). The trained
checkpoint and its mask decoder ship in `weights/` and load through the ordinary checkpoint path.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "demo"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The mask VQ-VAE, in vae-oid.npz's layout, beside the checkpoint.
MASK_DECODER_FILE = "vae-demo.npz"
ABOUT = (
    "model 'demo' is a small PaliGemma trained here on generated scenes only (1-3 red/green/blue/yellow "
    "circles, squares and triangles on a light background, sometimes a black word; see docs/demo.md). "
    "It answers caption, VQA, OCR, detect and segment about such scenes; on any other image its answers "
    "are outside its world and mean nothing."
)


def checkpoint_source(model: str) -> str:
    """Where PALIGEMMA_MODEL's checkpoint is read from: the demo's directory for `demo`, else the name."""
    return str(WEIGHTS_DIR) if model == MODEL_NAME else model
