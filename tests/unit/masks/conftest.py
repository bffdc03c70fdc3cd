"""Shared fixtures: the big_vision reference fixture and the seeded weights it was computed with."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from app.masks.decoder import MaskDecoder

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "vae_reference.npz"
REGENERATE = "JAX_PLATFORMS=cpu /tmp/jaxenv/bin/python scripts/make_vae_fixture.py (see its docstring)"


def _load_helper() -> ModuleType:
    # Loaded by path: tests/ is not a package, and the generator script loads the same file this way.
    path = Path(__file__).with_name("vae_fixture_weights.py")
    spec = importlib.util.spec_from_file_location("masks_vae_fixture_weights", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vae_helper() -> ModuleType:
    return _load_helper()


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="session")
def reference_weights(vae_helper: ModuleType, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    weights = vae_helper.random_vae_weights(int(reference["seed"]))
    digest = vae_helper.weights_sha256(weights)
    if digest != str(reference["weights_sha256"]):
        pytest.fail(
            f"the seeded weights no longer match the fixture (sha256 {digest}, fixture "
            f"{reference['weights_sha256']}): numpy {np.__version__} generates a different "
            f"default_rng stream than the one the fixture was made with ({reference['versions']}). "
            f"This is not a decoder bug; regenerate the fixture: {REGENERATE}",
            pytrace=False,
        )
    return weights


@pytest.fixture(scope="session")
def reference_npz(reference_weights: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "vae-seeded.npz"
    np.savez(path, **reference_weights)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
    return path


@pytest.fixture(scope="session")
def reference_decoder(reference_npz: Path) -> MaskDecoder:
    return MaskDecoder.from_npz(reference_npz)
