"""Seeded random weights in vae-oid.npz's layout, shared by `scripts/make_vae_fixture.py` and the tests.

The real file (~8 MB) cannot be committed or downloaded here, so the fixture stores only a seed, and both
sides regenerate the same weights from it. numpy does not promise that `default_rng` streams stay the
same across releases: `weights_sha256` lets the test tell "numpy changed its RNG" from "the port is wrong".

Key names and shapes are written out independently of `app.masks.decoder` (read off big_vision's
`_get_params`: PyTorch layout, Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw)), so a slip in
the app's expected shapes shows up as a test failure instead of being mirrored here.
"""

from __future__ import annotations

import hashlib

import numpy as np

FIXTURE_SEED = 23  # chosen among a few seeds: outputs within about +-5 and ~60% positive


def _layer_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"_vq_vae._embedding": (128, 512)}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)
        shapes[f"{name}.bias"] = (out_ch,)

    conv("decoder.0", 128, 512, 1)
    for block in ("decoder.2.net", "decoder.3.net"):
        conv(f"{block}.0", 128, 128, 3)
        conv(f"{block}.2", 128, 128, 3)
        conv(f"{block}.4", 128, 128, 1)
    for name, in_ch, out_ch in (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32),
                                ("decoder.10", 32, 16)):
        shapes[f"{name}.weight"] = (in_ch, out_ch, 4, 4)  # ConvTranspose2d layout
        shapes[f"{name}.bias"] = (out_ch,)
    conv("decoder.12", 1, 16, 1)
    return shapes


LAYER_SHAPES = _layer_shapes()


def random_vae_weights(seed: int = FIXTURE_SEED) -> dict[str, np.ndarray]:
    """float32 weights, scaled (He-like, per fan-in) so that the 64x64 outputs are O(1) and change sign:
    then an absolute tolerance of 1e-5 is a meaningful test and placed masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for key, shape in LAYER_SHAPES.items():
        if key == "_vq_vae._embedding":
            std = 1.0
        elif key.endswith(".bias"):
            std = 0.05
        elif key.startswith(("decoder.4.", "decoder.6.", "decoder.8.", "decoder.10.")):
            std = np.sqrt(2.0 / (shape[0] * 4))  # each output of a stride-2 k4 transpose sees in*2*2 taps
        else:
            std = np.sqrt(2.0 / np.prod(shape[1:]))
        if key.startswith("decoder.3.net.4.") or key.startswith("decoder.2.net.4."):
            std *= 0.5  # keep the residual branches from doubling the scale at each block
        weights[key] = (rng.standard_normal(shape) * std).astype(np.float32)
    return weights


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """Digest of names, shapes, dtypes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = np.ascontiguousarray(weights[key])
        digest.update(f"{key}|{value.shape}|{value.dtype.str}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
