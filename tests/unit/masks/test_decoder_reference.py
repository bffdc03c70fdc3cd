"""The PyTorch port against big_vision's Flax decoder (fixture: scripts/make_vae_fixture.py; no JAX here)."""

from __future__ import annotations

import logging
from dataclasses import astuple
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from app.masks import decoder as decoder_module
from app.masks.decoder import MaskDecoder, load_mask_decoder
from app.masks.placement import place_mask
from app.tasks.parsing import decode_box

ATOL = 1e-5
FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "vae_reference.npz"


def test_fixture_is_small_and_complete(reference: dict[str, np.ndarray]) -> None:
    assert FIXTURE.stat().st_size < 300_000
    assert reference["indices"].shape == (8, 16)
    assert reference["masks"].shape == (8, 64, 64) and reference["masks"].dtype == np.float32
    # The reference maps change sign, so thresholding at 0 is exercised, not trivially all-on/off.
    assert 0.2 < (reference["masks"] > 0).mean() < 0.8


def test_weight_layout_matches_big_vision_loader(vae_helper: ModuleType) -> None:
    # The helper spells out big_vision's key names/shapes independently of app.masks.decoder.
    assert MaskDecoder.expected_shapes() == vae_helper.LAYER_SHAPES


Arrays = dict[str, np.ndarray]


def test_port_matches_flax_reference(reference: Arrays, reference_decoder: MaskDecoder) -> None:
    codes = torch.from_numpy(reference["indices"])
    with torch.inference_mode():
        out = reference_decoder(codes)
    assert out.shape == (8, 64, 64) and out.dtype == torch.float32
    diff = np.abs(out.numpy() - reference["masks"]).max()
    print(f"max |torch - flax| = {diff:.3g}")
    np.testing.assert_allclose(out.numpy(), reference["masks"], rtol=0, atol=ATOL)


def test_batched_decoding_equals_one_by_one(reference: Arrays, reference_decoder: MaskDecoder) -> None:
    # 20 rows: two calls of DECODE_BATCH (16), the second one padded.
    codes = np.concatenate([reference["indices"], np.random.default_rng(7).integers(0, 128, (12, 16))])
    batched = reference_decoder.decode(codes)
    assert batched.shape == (20, 64, 64) and batched.dtype == np.float32
    # Every call has the same shape (padded to DECODE_BATCH rows), so a row's logits do not depend on
    # the other rows of its call or on its place in it: bit for bit, not just to rounding. Rows at both
    # ends of each call, decoded alone (each alone is a whole padded call).
    for row in (0, 7, 15, 16, 19):
        assert np.array_equal(reference_decoder.decode(codes[row][None])[0], batched[row]), row
    order = np.random.default_rng(8).permutation(len(codes))
    assert np.array_equal(reference_decoder.decode(codes[order]), batched[order])
    # Another call size gives other kernels: the same maps to float32 rounding (~6e-6 measured).
    chunked = reference_decoder.decode(codes, batch_size=5)
    with torch.inference_mode():
        unpadded = np.stack([reference_decoder(torch.from_numpy(c[None]))[0].numpy() for c in codes])
    np.testing.assert_allclose(chunked, batched, rtol=0, atol=ATOL)
    np.testing.assert_allclose(unpadded, batched, rtol=0, atol=ATOL)
    np.testing.assert_allclose(batched[:8], reference["masks"], rtol=0, atol=ATOL)


def test_decode_takes_what_the_parser_gives(reference: Arrays, reference_decoder: MaskDecoder) -> None:
    as_tuples = [tuple(int(v) for v in row) for row in reference["indices"]]  # ParsedObject.mask_tokens
    expected = reference_decoder.decode(reference["indices"])
    assert np.array_equal(reference_decoder.decode(as_tuples), expected)
    assert np.array_equal(reference_decoder.decode(torch.from_numpy(reference["indices"])), expected)
    for empty in ([], np.zeros((0, 16), np.int64), torch.zeros(0, 16, dtype=torch.long)):
        out = reference_decoder.decode(empty)
        assert out.shape == (0, 64, 64) and out.dtype == np.float32


@pytest.mark.parametrize(
    ("codes", "match"),
    [([[128] * 16], r"\[0, 128\)"), ([[-1] * 16], r"\[0, 128\)"), ([[0] * 15], "shape"),
     (np.zeros((1, 16), np.float32), "integers"), ([0] * 16, "shape")],
)
def test_decode_refuses_bad_codes_before_running(reference_decoder: MaskDecoder, codes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reference_decoder.decode(codes)
    with pytest.raises(ValueError, match="batch_size"):
        reference_decoder.decode([[0] * 16], batch_size=0)


def test_placed_masks_match_big_vision(reference: Arrays, reference_decoder: MaskDecoder) -> None:
    logits = reference_decoder.decode(reference["indices"])
    for k, (index, y1, x1, y2, x2, height, width) in enumerate(reference["place_spec"].tolist()):
        expected = np.unpackbits(reference[f"placed_{k}"], count=height * width).reshape(height, width)
        placed = place_mask(logits[index], astuple(decode_box([y1, x1, y2, x2])), width, height)
        assert placed.shape == (height, width)
        assert np.array_equal(placed, expected.astype(bool)), f"placement {k} differs"
        # The same from the exact Flax maps (placement alone, independent of the port's 1e-6 noise).
        from_flax = place_mask(reference["masks"][index], astuple(decode_box([y1, x1, y2, x2])), width, height)
        assert np.array_equal(from_flax, expected.astype(bool))


def test_decode_rejects_bad_codes(reference_decoder: MaskDecoder) -> None:
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        reference_decoder(torch.full((1, 16), 128))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        reference_decoder(torch.full((1, 16), -1))
    with pytest.raises(ValueError, match="shape"):
        reference_decoder(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        reference_decoder(torch.zeros(1, 16))


def test_load_mask_decoder_warns_for_unpublished_weights(
    reference_npz, reference: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=decoder_module.__name__):
        loaded = load_mask_decoder(reference_npz, "cpu")
    assert not loaded.matches_published
    assert len(loaded.sha256) == 64 and loaded.path == reference_npz
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not the published vae-oid.npz" in warnings[0].getMessage()
    with torch.inference_mode():
        out = loaded.decoder(torch.from_numpy(reference["indices"][:2]))
    np.testing.assert_allclose(out.numpy(), reference["masks"][:2], rtol=0, atol=ATOL)


def test_load_mask_decoder_logs_info_for_published_digest(
    reference_npz, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    digest, _ = decoder_module._file_digest(reference_npz)
    monkeypatch.setattr(decoder_module, "PUBLISHED_SHA256", digest)
    with caplog.at_level(logging.INFO, logger=decoder_module.__name__):
        loaded = load_mask_decoder(reference_npz, torch.device("cpu"))
    assert loaded.matches_published and loaded.sha256 == digest
    assert [r.levelno for r in caplog.records] == [logging.INFO]
