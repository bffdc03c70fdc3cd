from __future__ import annotations

from pathlib import Path

import pytest

from tests.trained_model import train


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PaliGemma trained to emit known detect/segment outputs, saved with save_pretrained."""
    return train(tmp_path_factory.mktemp("trained-paligemma"))
