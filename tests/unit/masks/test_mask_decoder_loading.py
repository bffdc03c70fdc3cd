"""Refusal of unusable weights files: each message names the problem (files written here, in tmp_path)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app.masks import decoder as decoder_module
from app.masks.decoder import MaskDecoder, MaskDecoderError, load_mask_decoder

FIX_HINT = "PALIGEMMA_MASK_DECODER"
Arrays = dict[str, np.ndarray]


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
    return path


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(MaskDecoderError) as info:
        MaskDecoder.from_npz(path)
    message = str(info.value)
    for fragment in (*fragments, FIX_HINT):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.npz", "no file at")
    with pytest.raises(MaskDecoderError, match="no file at"):
        load_mask_decoder(tmp_path / "nope.npz", "cpu")


def test_not_a_zip(tmp_path: Path) -> None:
    text = tmp_path / "vae-oid.npz"
    text.write_text("<html>403 Forbidden</html>")
    _refused(text, "not an .npz archive", "not a zip file")
    npy = tmp_path / "weights.npz"
    with npy.open("wb") as f:
        np.save(f, np.zeros(3, np.float32))  # a lone .npy, not an archive
    _refused(npy, "not an .npz archive")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _refused(empty, "not an .npz archive")


def test_truncated_download(tmp_path: Path, reference_npz: Path) -> None:
    cut = tmp_path / "cut.npz"
    cut.write_bytes(reference_npz.read_bytes()[:100_000])
    _refused(cut, "truncated or damaged zip")


def test_corrupted_member(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    path = _write(tmp_path / "w.npz", reference_weights)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some member's data: its CRC no longer matches
    path.write_bytes(bytes(data))
    _refused(path, "damaged .npz")


def test_missing_key(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = {k: v for k, v in reference_weights.items() if k != "decoder.6.weight"}
    _refused(_write(tmp_path / "w.npz", weights), "missing keys", "decoder.6.weight")


def test_wrong_shape(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights, **{"decoder.0.weight": np.zeros((128, 256, 1, 1), np.float32)})
    path = _write(tmp_path / "w.npz", weights)
    _refused(path, "`decoder.0.weight` has shape (128, 256, 1, 1)", "expected (128, 512, 1, 1)")
    # A Flax-layout (already transposed) transpose-conv kernel is refused, not silently misread.
    weights = dict(reference_weights)
    weights["decoder.4.weight"] = np.transpose(weights["decoder.4.weight"], (2, 3, 1, 0)).copy()
    _refused(_write(tmp_path / "w2.npz", weights), "`decoder.4.weight` has shape (4, 4, 128, 128)")


def test_renamed_key(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights)
    weights["decoder.4.kernel"] = weights.pop("decoder.4.weight")
    path = _write(tmp_path / "w.npz", weights)
    message = _refused(path, "missing keys", "decoder.4.weight", "unexpected keys")
    assert "decoder.4.kernel" in message


def test_extra_key(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights, **{"decoder.14.weight": np.zeros((1, 1, 1, 1), np.float32)})
    _refused(_write(tmp_path / "w.npz", weights), "unexpected keys ['decoder.14.weight']")


def test_encoder_keys_of_the_published_file_are_ignored(
    tmp_path: Path, reference_weights: dict[str, np.ndarray]
) -> None:
    # vae-oid.npz also carries the VQ-VAE encoder (big_vision's tokenizer reads encoder.* from it).
    weights = dict(reference_weights, **{
        "encoder.0.weight": np.zeros((16, 1, 4, 4), np.float32),
        "encoder.8.net.0.bias": np.zeros(128, np.float32),
        "_vq_vae._ema_cluster_size": np.zeros(128, np.float32),
    })
    MaskDecoder.from_npz(_write(tmp_path / "w.npz", weights))


def test_unknown_keys_allowed_for_the_published_digest(
    tmp_path: Path, reference_weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _write(tmp_path / "w.npz", dict(reference_weights, extra_stats=np.zeros(3, np.float32)))
    _refused(path, "unexpected keys ['extra_stats']")
    monkeypatch.setattr(decoder_module, "PUBLISHED_SHA256", decoder_module._file_digest(path)[0])
    with caplog.at_level(logging.INFO, logger=decoder_module.__name__):
        assert load_mask_decoder(path, "cpu").matches_published
    assert "published vae-oid.npz" in caplog.text


def test_wrong_dtype(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights)
    weights["decoder.12.bias"] = np.zeros(1, np.int32)
    _refused(_write(tmp_path / "w.npz", weights), "`decoder.12.bias` has dtype int32", "floating point")


def test_float64_weights_are_cast_to_float32(tmp_path: Path, reference_weights: Arrays) -> None:
    weights = {k: v.astype(np.float64) for k, v in reference_weights.items()}
    decoder = MaskDecoder.from_npz(_write(tmp_path / "w.npz", weights), torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in decoder.parameters())


def test_non_finite_weights(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights)
    weights["decoder.2.net.2.bias"] = weights["decoder.2.net.2.bias"].copy()
    weights["decoder.2.net.2.bias"][3] = np.nan
    _refused(_write(tmp_path / "w.npz", weights), "`decoder.2.net.2.bias` contains NaN")


def test_pickled_object_array_is_refused(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights, **{"decoder.0.bias": np.array([{"x": 1}], dtype=object)})
    _refused(_write(tmp_path / "w.npz", weights), "pickled object arrays")


def test_zip_that_is_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "hello")
    message = _refused(path, "missing keys", "unexpected keys")
    assert "README.txt" in message


def test_every_problem_is_reported_at_once(tmp_path: Path, reference_weights: dict[str, np.ndarray]) -> None:
    weights = dict(reference_weights)
    del weights["_vq_vae._embedding"]
    weights["decoder.10.bias"] = np.zeros(17, np.float32)
    _refused(_write(tmp_path / "w.npz", weights), "_vq_vae._embedding", "`decoder.10.bias` has shape (17,)")


def test_loads_onto_the_requested_device(reference_npz: Path) -> None:
    decoder = MaskDecoder.from_npz(str(reference_npz), "cpu")
    assert decoder.device == torch.device("cpu") and not decoder.training
    assert not any(p.requires_grad for p in decoder.parameters())
