"""PyTorch port of the VQ-VAE mask decoder that PaliGemma's `<seg…>` tokens are decoded with.

Reference: big_vision `big_vision/evaluators/proj/paligemma/transfers/segmentation.py` (`Decoder`,
`ResBlock`, `_get_params`, `_quantized_values_from_codebook_indices`). The weights file, `vae-oid.npz`,
stores the original PyTorch layout, so the port loads it as it is; big_vision's Flax loader transposes
every kernel with (2, 3, 1, 0), and Flax `ConvTranspose(kernel 4, stride 2, padding 2,
transpose_kernel=True)` is exactly `torch.nn.ConvTranspose2d(kernel 4, stride 2, padding=1)` on the
PyTorch-layout weight (both pad the stride-dilated input by 2 and correlate with the flipped kernel).
`tests/unit/masks/test_decoder_reference.py` holds the port to the Flax module's outputs (fixture made by
`scripts/make_vae_fixture.py`).

Hand-written because big_vision ships the decoder only as a Flax module and no PyTorch library has it.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PUBLISHED_SHA256 = "5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447"
PUBLISHED_SIZE = 8_479_556

CODEBOOK_SIZE = 128  # <seg000>..<seg127>
EMBED_DIM = 512  # width of a codebook vector in vae-oid.npz
NUM_CODES = 16  # one 4x4 grid of codebook vectors per mask
MASK_SIZE = 64
# Rows per decoder call (see `MaskDecoder.decode`); on 2 CPU cores 16 rows take ~5 ms, one ~1 ms.
DECODE_BATCH = 16

_HOW_TO_FIX = (
    "PALIGEMMA_MASK_DECODER must point at big_vision's vae-oid.npz "
    f"(gs://big_vision/paligemma/vae-oid.npz, {PUBLISHED_SIZE:,} bytes, sha256 {PUBLISHED_SHA256}); "
    "download it again or unset the variable to run without masks"
)
# The published file also carries the VQ-VAE's encoder (big_vision's tokenizer op reads `encoder.*` from
# the same file) and may carry other codebook state under `_vq_vae.`; the decoder does not use them.
_IGNORED_PREFIXES = ("encoder.", "_vq_vae.")
_EMBEDDING_KEY = "_vq_vae._embedding"


class MaskDecoderError(Exception):
    """The mask decoder weights file is unusable; the message says what is wrong and how to fix it."""


class _ResBlock(nn.Module):
    """big_vision `ResBlock`: conv3x3, ReLU, conv3x3, ReLU, conv1x1, plus the input (no ReLU after)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Indices 0, 2, 4 in a Sequential reproduce the weight names `decoder.N.net.{0,2,4}`.
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskDecoder(nn.Module):
    """Exact port of big_vision's decoder: codebook lookup -> (B,4,4,D) -> 1x1 conv ->128, ReLU; 2 ResBlocks;
    4 x ConvTranspose(k4,s2,'transpose_kernel=True' semantics) + ReLU; 1x1 conv -> 1. float32.

    Parameter names are those of vae-oid.npz (`codebook` stands for `_vq_vae._embedding`), so the file
    loads with `load_state_dict(strict=True)` after its keys and shapes have been checked.
    On the CPU it reproduces the Flax module to ~5e-6 (tested at 1e-5). On CUDA, PyTorch runs float32
    convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`), which is ~1e-3 relative; that is a
    process-wide switch for the service to choose, not something this module flips.
    """

    def __init__(self, embed_dim: int = EMBED_DIM, codebook_size: int = CODEBOOK_SIZE) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.codebook = nn.Parameter(torch.zeros(codebook_size, embed_dim), requires_grad=False)
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, 128, 1), nn.ReLU(), _ResBlock(128), _ResBlock(128)]
        for in_ch, out_ch in ((128, 128), (128, 64), (64, 32), (32, 16)):  # 4 -> 8 -> 16 -> 32 -> 64 px
            layers += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(16, 1, 1))
        self.decoder = nn.Sequential(*layers)  # indices 0..12 as in the weights file
        self.requires_grad_(False)

    @classmethod
    def expected_shapes(cls) -> dict[str, tuple[int, ...]]:
        """Every weights-file key the decoder needs, with its shape (PyTorch layout)."""
        shapes = {name: tuple(p.shape) for name, p in cls().state_dict().items()}
        shapes[_EMBEDDING_KEY] = shapes.pop("codebook")
        return shapes

    @classmethod
    def from_npz(
        cls, path: str | Path, device: str | torch.device = "cpu", *, allow_unknown_keys: bool = False
    ) -> MaskDecoder:
        """Load vae-oid.npz after checking every key, shape and dtype; raise `MaskDecoderError` if wrong.

        Keys under `encoder.`/`_vq_vae.` that the decoder does not use are ignored; any other key that is
        not expected is refused (a renamed or foreign layer) unless `allow_unknown_keys`, which
        `load_mask_decoder` sets for the byte-identical published file.
        """
        path = Path(path)
        arrays = _read_npz(path)
        state = _checked_state(arrays, path, allow_unknown_keys)
        decoder = cls()
        decoder.load_state_dict(state, strict=True)
        return decoder.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 16) integer codebook indices in [0, 128) -> (N, 64, 64) float32 mask logits (> 0 is inside).
        The service calls `decode`, which batches, pads and validates once.

        Token i of the 16 fills row i // 4, column i % 4 of the 4x4 grid, as big_vision's reshape does.
        """
        if codes.ndim == 2 and codes.shape[0] == 0:
            return torch.zeros(0, MASK_SIZE, MASK_SIZE, device=self.device)
        _check_codes(codes, self.codebook_size)
        codes = codes.to(device=self.device, dtype=torch.long)
        x = self.codebook[codes]  # (N, 16, D)
        x = x.view(-1, 4, 4, self.embed_dim).permute(0, 3, 1, 2)  # NHWC (big_vision) -> NCHW
        return self.decoder(x)[:, 0]

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
               batch_size: int = DECODE_BATCH) -> np.ndarray:
        """The one entry point that runs the decoder on codes: (N, 16) codebook indices, as an array, a
        tensor or a list of token tuples -> (N, 64, 64) float32 numpy logits on the CPU (> 0 is inside).

        Rows run in calls of exactly `batch_size`, the last one padded with code 0: every call has the
        same shape, so a row's logits are bit-identical whatever rows share its call and wherever it sits
        (kernels are picked by shape: a call of another size agrees with one-by-one decoding only to
        float32 rounding), and a mask never depends on which requests were batched with it. Memory is
        bounded by `batch_size`. Invalid codes raise ValueError before anything runs.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        rows = codes if isinstance(codes, torch.Tensor) else torch.as_tensor(np.asarray(codes))
        if rows.numel() == 0:
            return np.zeros((0, MASK_SIZE, MASK_SIZE), dtype=np.float32)
        _check_codes(rows, self.codebook_size)
        rows = rows.to(device=self.device, dtype=torch.long)
        count = rows.shape[0]
        calls = -(-count // batch_size)
        padded = torch.zeros(calls * batch_size, NUM_CODES, dtype=torch.long, device=self.device)
        padded[:count] = rows
        # On CUDA, no TF32 and one fixed algorithm: TF32 convolutions (and algorithms picked per call)
        # made a mask differ by a pixel between runs; in float32 it is the same mask every time.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            logits = torch.cat([self(chunk).cpu() for chunk in padded.split(batch_size)])
        return logits[:count].numpy()


def _check_codes(codes: torch.Tensor, codebook_size: int) -> None:
    if codes.ndim != 2 or codes.shape[1] != NUM_CODES:
        raise ValueError(f"codes must have shape (N, {NUM_CODES}); got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers; got {codes.dtype}")
    # Checked before the lookup because an out-of-range index on CUDA is a device-side assert that
    # poisons the whole CUDA context, not a catchable error.
    if bool(((codes < 0) | (codes >= codebook_size)).any()):
        low, high = int(codes.min()), int(codes.max())
        raise ValueError(f"codes must lie in [0, {codebook_size}); got {low}..{high}")


@dataclass(frozen=True)
class LoadedMaskDecoder:
    decoder: MaskDecoder
    path: Path
    sha256: str
    matches_published: bool


def load_mask_decoder(path: str | Path, device: str | torch.device = "cpu", *,
                      bundled: bool = False) -> LoadedMaskDecoder:
    """Hash the file, load it with every check, and log whether it is the published vae-oid.npz.
    `bundled`: the file came with the checkpoint (the demo model's own VQ-VAE), so another hash than the
    published one is expected and not warned about."""
    path = Path(path)
    sha256, size = _file_digest(path)
    matches = sha256 == PUBLISHED_SHA256
    # The published file is right by definition, whatever extra keys it carries.
    decoder = MaskDecoder.from_npz(path, device, allow_unknown_keys=matches)
    if matches:
        logger.info("mask decoder: loaded the published vae-oid.npz from %s (sha256 %s)", path, sha256)
    elif bundled:
        logger.info("mask decoder: loaded the model's own VQ-VAE from %s (sha256 %s)", path, sha256)
    else:
        logger.warning(
            "mask decoder: %s (%s bytes, sha256 %s) is not the published vae-oid.npz (%s bytes, sha256 %s); "
            "its keys and shapes fit the decoder, so masks will come from these weights as they are",
            path, f"{size:,}", sha256, f"{PUBLISHED_SIZE:,}", PUBLISHED_SHA256,
        )
    return LoadedMaskDecoder(decoder=decoder, path=path, sha256=sha256, matches_published=matches)


def _file_digest(path: Path) -> tuple[str, int]:
    if not path.is_file():
        raise MaskDecoderError(f"mask decoder weights: no file at {path}; {_HOW_TO_FIX}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


def _read_npz(path: Path) -> dict[str, object]:
    """Every member of the archive, as arrays (or raw bytes for members that are not .npy)."""
    if not path.is_file():
        raise MaskDecoderError(f"mask decoder weights: no file at {path}; {_HOW_TO_FIX}")
    with path.open("rb") as f:
        starts_like_zip = f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # what np.load looks for
    if not starts_like_zip or not zipfile.is_zipfile(path):
        what = "a truncated or damaged zip (interrupted download?)" if starts_like_zip else "not a zip file"
        raise MaskDecoderError(
            f"mask decoder weights: {path} is not an .npz archive: {what}, {path.stat().st_size:,} bytes; "
            f"{_HOW_TO_FIX}"
        )
    try:
        # allow_pickle=False: a weights file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise MaskDecoderError(
                f"mask decoder weights: {path} holds pickled object arrays, which are refused because "
                f"loading them could run code; {_HOW_TO_FIX}"
            ) from exc
        raise MaskDecoderError(
            f"mask decoder weights: {path} is a damaged .npz ({exc}); {_HOW_TO_FIX}"
        ) from exc
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as exc:
        raise MaskDecoderError(
            f"mask decoder weights: {path} is a damaged .npz ({type(exc).__name__}: {exc}); {_HOW_TO_FIX}"
        ) from exc


def _checked_state(arrays: dict[str, object], path: Path, allow_unknown: bool) -> dict[str, torch.Tensor]:
    """Collect every problem (not only the first) so one error message says all that is wrong."""
    expected = MaskDecoder.expected_shapes()
    problems: list[str] = []
    missing = [key for key in expected if key not in arrays]
    if missing:
        problems.append(f"missing keys {missing}")
    unknown = sorted(k for k in arrays if k not in expected and not k.startswith(_IGNORED_PREFIXES))
    if unknown and not allow_unknown:
        problems.append(f"unexpected keys {unknown} (renamed layers, or not the PaliGemma VQ-VAE)")
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        value = arrays.get(key)
        if value is None:
            continue
        if not isinstance(value, np.ndarray):
            problems.append(f"`{key}` is not a numpy array (.npy) member")
        elif value.dtype.kind != "f":
            problems.append(f"`{key}` has dtype {value.dtype}, expected floating point (float32)")
        elif value.shape != shape:
            problems.append(f"`{key}` has shape {value.shape}, expected {shape}")
        elif not np.isfinite(value).all():
            problems.append(f"`{key}` contains NaN or infinite values")
        else:
            state["codebook" if key == _EMBEDDING_KEY else key] = torch.from_numpy(
                np.ascontiguousarray(value, dtype=np.float32)
            )
    if problems:
        raise MaskDecoderError(
            f"mask decoder weights: {path} does not fit the PaliGemma mask decoder: "
            + "; ".join(problems)
            + f"; {_HOW_TO_FIX}"
        )
    return state
