"""The demo's mask VQ-VAE: the server's decoder (`app.masks.decoder.MaskDecoder`, Google's architecture)
trained here with an encoder of our own on the demo world's object masks, saved in `vae-oid.npz`'s layout.

As big_vision tokenizes a mask, an object's mask is cropped to its box and resized to 64 x 64; the
encoder maps it to a 4 x 4 grid of 512-wide vectors, each replaced by its nearest of 128 codebook vectors
(the `<segNNN>` index), and the decoder maps the grid back to 64 x 64 logits (> 0 inside). The file holds
the decoder's keys exactly as `vae-oid.npz` does (`_vq_vae._embedding`, `decoder.*`), plus the encoder
under `encoder.*`, which the server's loader skips as it skips Google's encoder.

Pillow's drawing is translation-invariant at integer positions, so a crop depends only on the shape and
its size: the world has 3 x 61 distinct crops, and `MaskTokenizer` caches their codes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from app.demo.world import SHAPES, SIZE_RANGE, SceneObject, object_mask, tight_box
from app.masks.decoder import CODEBOOK_SIZE, EMBED_DIM, MASK_SIZE, MaskDecoder

logger = logging.getLogger(__name__)

_EMBEDDING_KEY = "_vq_vae._embedding"
_COMMITMENT = 0.25


def mask_crop(obj: SceneObject) -> np.ndarray:
    """The object's mask cropped to its box and resized to 64 x 64 (bilinear, float32 in [0, 1])."""
    x0, y0, x1, y1 = tight_box(obj)
    crop = object_mask(obj)[y0:y1, x0:x1].astype(np.float32)
    resized = Image.fromarray(crop, "F").resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def all_crops() -> tuple[list[tuple[str, int]], np.ndarray]:
    """Every distinct crop of the world: (shape, size) keys and a (N, 64, 64) float32 array."""
    keys = [(shape, size) for shape in SHAPES for size in range(SIZE_RANGE[0], SIZE_RANGE[1] + 1)]
    crops = np.stack([mask_crop(SceneObject(shape, "red", (0, 0, 0), 0, 0, size)) for shape, size in keys])
    return keys, crops


class MaskEncoder(nn.Module):
    """64 x 64 mask -> 4 x 4 x 512: four stride-2 convolutions and a 1 x 1 projection."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),  # 32 px
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),  # 16 px
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.ReLU(),  # 8 px
            nn.Conv2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),  # 4 px
            nn.Conv2d(128, EMBED_DIM, 1),
        )

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, 64, 64) in [0, 1] -> (N, 512, 4, 4)."""
        return self.layers(masks.unsqueeze(1) * 2 - 1)


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, 512, 4, 4) encoder outputs -> (N, 16) codebook indices, row-major over the grid (token i is row
    i // 4, column i % 4, as the decoder reads them)."""
    flat = vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
    distances = torch.cdist(flat, codebook)
    return distances.argmin(dim=1).view(vectors.shape[0], 16)


class MaskVQVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = MaskEncoder()
        self.decoder = MaskDecoder()
        self.decoder.requires_grad_(True)

    def loss(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (BCE on logits) + codebook + commitment; and the reconstruction alone."""
        z = self.encoder(masks)
        codebook = self.decoder.codebook
        codes = nearest_codes(z, codebook)
        quantized = codebook[codes].view(z.shape[0], 4, 4, EMBED_DIM).permute(0, 3, 1, 2)
        vq = F.mse_loss(quantized, z.detach()) + _COMMITMENT * F.mse_loss(z, quantized.detach())
        straight_through = z + (quantized - z).detach()
        logits = self.decoder.decoder(straight_through)[:, 0]
        reconstruction = F.binary_cross_entropy_with_logits(logits, masks)
        return reconstruction + vq, reconstruction


def train_mask_vqvae(seed: int, steps: int, batch_size: int = 32, lr: float = 2e-3,
                     log: Callable[[str], None] = logger.info) -> MaskVQVAE:
    """Train on every crop of the world (sampled with replacement, seeded)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _, crops = all_crops()
    data = torch.from_numpy(crops)
    model = MaskVQVAE()
    with torch.no_grad():
        # Codebook from encoder outputs, so that every code starts near the data (no dead codebook).
        z = model.encoder(data[torch.randint(len(data), (64,), generator=generator)])
        vectors = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        picked = vectors[torch.randperm(len(vectors), generator=generator)[:CODEBOOK_SIZE]]
        model.decoder.codebook.copy_(picked + 0.01 * torch.randn(picked.shape, generator=generator))
    model.decoder.codebook.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss, reconstruction = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 1 or step % 50 == 0 or step == steps:  # the first step: where the loss started
            log(f"mask vq-vae step {step}/{steps}: loss {loss.item():.4f} reconstruction "
                f"{reconstruction.item():.4f}")
    return model.eval()


def save_npz(model: MaskVQVAE, path: Path, dtype: np.dtype = np.dtype(np.float32)) -> Path:
    """Write the `vae-oid.npz` layout: the decoder's keys as the published file has them, plus `encoder.*`."""
    arrays = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    for key, value in model.decoder.state_dict().items():
        arrays[_EMBEDDING_KEY if key == "codebook" else key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **{k: v.detach().cpu().numpy().astype(dtype) for k, v in arrays.items()})
    return path


class MaskTokenizer:
    """The 16 codebook indices of an object's mask, read from a saved npz (the same file the server
    decodes with), cached by (shape, size)."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as npz:
            encoder_state = {k.removeprefix("encoder."): torch.from_numpy(npz[k].astype(np.float32))
                             for k in npz.files if k.startswith("encoder.")}
            self.codebook = torch.from_numpy(npz[_EMBEDDING_KEY].astype(np.float32))
        self.encoder = MaskEncoder()
        self.encoder.load_state_dict(encoder_state)
        self.encoder.eval()

    @torch.no_grad()
    def codes_of_crops(self, crops: np.ndarray) -> np.ndarray:
        return nearest_codes(self.encoder(torch.from_numpy(crops)), self.codebook).numpy()

    @functools.cache  # noqa: B019 (a few hundred keys, one tokenizer per process)
    def _codes(self, shape: str, size: int) -> tuple[int, ...]:
        crop = mask_crop(SceneObject(shape, "red", (0, 0, 0), 0, 0, size))
        return tuple(int(c) for c in self.codes_of_crops(crop[None])[0])

    def __call__(self, obj: SceneObject) -> tuple[int, ...]:
        return self._codes(obj.shape, obj.size)
