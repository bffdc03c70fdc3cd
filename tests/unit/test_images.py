"""app.images: sniffing, refusals (status and message), mode conversion, orientation, draft decoding."""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, WebPImagePlugin

from app import images
from app.errors import InvalidImage, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.images import ACCEPTED_FORMATS, DecodedImage, decode_image, sniff_format, to_rgb, upload_key
from tests.badinputs import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    bad_inputs,
    corrupt_exif_jpegs,
    distinct_tag_jpegs,
    png_bytes,
)

ERROR_FOR_STATUS = {400: InvalidImage, 413: PayloadTooLarge, 415: UnsupportedMediaType}
CASES = bad_inputs()


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _decode(data: bytes, **options: int) -> DecodedImage:
    return decode_image(data, max_pixels=options.pop("max_pixels", DEFAULT_MAX_PIXELS), **options)


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in pixel) for pixel in np.asarray(image).reshape(-1, len(image.getbands()))]


# --------------------------------------------------------------------------------------------------
# The bad-input catalogue.


def test_catalogue_is_large_unique_and_deterministic() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    assert {case.expected_status for case in CASES} == {200, 400, 413, 415}
    again = bad_inputs.__wrapped__()
    assert [(c.name, c.data) for c in again] == [(c.name, c.data) for c in CASES]
    assert all(c.expected_size is not None for c in CASES if c.expected_status == 200)


@pytest.mark.filterwarnings("error")  # no DecompressionBombWarning, EXIF or other Pillow warning escapes
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: BadInput) -> None:
    if case.expected_status == 200:
        decoded = _decode(case.data)
        assert decoded.image.mode == "RGB"
        assert (decoded.width, decoded.height) == case.expected_size
        assert decoded.image.size == case.expected_size
        assert decoded.format in ACCEPTED_FORMATS
        return
    with pytest.raises(ServiceError) as caught:
        _decode(case.data)
    error = caught.value
    assert type(error) is ERROR_FOR_STATUS[case.expected_status], error.message
    assert error.status_code == case.expected_status
    assert error.param == "image"
    assert len(error.message) > 20


@pytest.mark.parametrize("name", ["apng_animated", "webp_animated"])
def test_animated_images_use_the_first_frame(name: str) -> None:
    decoded = _decode(_case(name).data)
    assert set(_pixels(decoded.image)) == {(255, 0, 0)}


def test_polyglot_and_trailing_garbage_decode_the_sniffed_image() -> None:
    assert _decode(_case("png_zip_polyglot").data).format == "PNG"
    assert _decode(_case("jpeg_trailing_garbage").data).format == "JPEG"


def test_decoding_is_thread_safe() -> None:
    accepted = [case for case in CASES if case.expected_status == 200]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: _decode(case.data), accepted * 4))
    assert [(r.width, r.height) for r in results] == [case.expected_size for case in accepted * 4]


def test_mutated_images_only_ever_raise_our_errors() -> None:
    """A small deterministic fuzz: flipped bytes, cuts and insertions in the accepted files."""
    seeds = [case.data for case in CASES if case.expected_status == 200 and len(case.data) < 5000]
    rng = random.Random(7)
    outcomes: set[int] = set()
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        where = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[where] = rng.randrange(256)
        elif action == 1:
            del data[where:]
        else:
            data[where:where] = rng.randbytes(rng.randint(1, 32))
        try:
            assert _decode(bytes(data), min_side=rng.choice([None, 8])).image.mode == "RGB"
            outcomes.add(200)
        except (InvalidImage, PayloadTooLarge, UnsupportedMediaType) as error:
            outcomes.add(error.status_code)
    assert {200, 400, 415} <= outcomes


def _case(name: str) -> BadInput:
    return next(case for case in CASES if case.name == name)


# --------------------------------------------------------------------------------------------------
# Sniffing and messages.


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\xff\xd8\xff\xe1", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"\xff\xd8", None),  # too short to tell
        (b"\x89PNG\r\n", None),
        (b"RIFF\x10\x00\x00\x00WAVE", None),
        (b"GIF89a", None),
        (b"BM", None),
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


def test_format_comes_from_the_bytes_only() -> None:
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    assert _decode(png).format == "PNG"
    assert _decode(_encode(Image.new("RGB", (4, 4)), "WEBP")).format == "WEBP"


def test_messages_say_what_the_limit_and_the_fix_are() -> None:
    with pytest.raises(InvalidImage, match=r"the image is empty \(0 bytes\)"):
        _decode(b"")
    with pytest.raises(UnsupportedMediaType, match=r"\(GIF\).*JPEG, PNG or WebP.*convert"):
        _decode(_case("gif").data)
    with pytest.raises(PayloadTooLarge) as caught:
        _decode(_case("png_zip_bomb_20000").data)
    assert caught.value.message.startswith(
        "image is 20000x20000 = 400000000 pixels; the limit is 50000000 (PALIGEMMA_MAX_IMAGE_PIXELS)"
    )
    assert "downscale" in caught.value.message
    with pytest.raises(InvalidImage, match=r"PNG image could not be decoded .*truncated or corrupt"):
        _decode(_case("png_truncated_half").data)


def test_pixel_limit_is_inclusive() -> None:
    png = _encode(Image.new("RGB", (10, 10)), "PNG")
    assert _decode(png, max_pixels=100).width == 10
    with pytest.raises(PayloadTooLarge, match=r"10x10 = 100 pixels; the limit is 99 "):
        _decode(png, max_pixels=99)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        decode_image(b"x", max_pixels=0)
    with pytest.raises(ValueError):
        decode_image(b"x", max_pixels=10, min_side=0)


# --------------------------------------------------------------------------------------------------
# Refusing before decoding.


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", [case.name for case in CASES if case.expected_status == 413])
def test_pixel_limit_refuses_before_any_decoding(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original_load = ImageFile.ImageFile.load
    original_webp_open = WebPImagePlugin.WebPImageFile._open

    def load(self: ImageFile.ImageFile) -> object:
        calls.append("load")
        return original_load(self)

    def webp_open(self: WebPImagePlugin.WebPImageFile) -> None:  # allocates the canvas
        calls.append("webp_open")
        original_webp_open(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "_open", webp_open)
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge):
        _decode(_case(name).data)
    assert time.perf_counter() - started < 2.0  # sanity only; the real check is `calls`
    assert calls == []
    _decode(_case("png_1x1").data)  # positive control: the probe does see a real decode
    assert calls == ["load"]


@pytest.mark.filterwarnings("error")
def test_pillow_global_limit_neither_warns_nor_refuses_for_us(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our max_pixels is the only limit for JPEG/PNG: Image.open's global check is not used.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for fmt in ("JPEG", "PNG"):
        assert _decode(_encode(Image.new("RGB", (64, 48)), fmt)).width == 64
    # The WebP plugin checks it itself while opening; it becomes our 413, never a raw exception.
    with pytest.raises(PayloadTooLarge, match="exceeds the decoder's pixel limit"):
        _decode(_encode(Image.new("RGB", (64, 48)), "WEBP", lossless=True))


def test_load_truncated_images_is_left_false_and_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    for case in CASES:
        with contextlib.suppress(ServiceError):
            _decode(case.data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ServiceError) as caught:
        _decode(_case("jpeg_truncated_half").data)
    assert caught.value.status_code == 500
    assert "LOAD_TRUNCATED_IMAGES" in caught.value.message


@pytest.mark.parametrize(
    "error",
    [
        OSError("broken"),
        ValueError("bad"),
        SyntaxError("nope"),
        struct.error("short"),
        EOFError(),
        IndexError("index"),
        ZeroDivisionError("div"),
        MemoryError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_any_pillow_exception_becomes_invalid_image(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(data: bytes, fmt: str) -> None:
        raise error

    monkeypatch.setattr(images, "_open", fail)
    with pytest.raises(InvalidImage) as caught:
        _decode(_encode(Image.new("RGB", (4, 4)), "PNG"))
    assert caught.value.__cause__ is error


def test_decompression_bomb_error_becomes_payload_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(data: bytes, fmt: str) -> None:
        raise Image.DecompressionBombError("Image size (1 pixels) exceeds limit")

    monkeypatch.setattr(images, "_open", fail)
    with pytest.raises(PayloadTooLarge):
        _decode(_encode(Image.new("RGB", (4, 4)), "PNG"))


# --------------------------------------------------------------------------------------------------
# Modes and exact pixels.


def test_rgba_is_composited_on_white_exactly() -> None:
    rgba = Image.new("RGBA", (2, 2))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque: unchanged
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # transparent: white
    rgba.putpixel((0, 1), (0, 0, 0, 128))  # (0 * 128 + 255 * 127) / 255 = 127
    rgba.putpixel((1, 1), (0, 255, 0, 64))  # 255 * 191 / 255 = 191
    decoded = _decode(_encode(rgba, "PNG"))
    assert _pixels(decoded.image) == [(255, 0, 0), (255, 255, 255), (127, 127, 127), (191, 255, 191)]


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    decoded = _decode(_encode(palette, "PNG", transparency=bytes([255, 0, 128])))
    assert _pixels(decoded.image) == [(255, 0, 0), (255, 255, 255), (127, 127, 255)]
    # A single transparent index (PNG tRNS with one entry) works the same way.
    decoded = _decode(_encode(palette, "PNG", transparency=0))
    assert _pixels(decoded.image) == [(255, 255, 255), (0, 255, 0), (0, 0, 255)]


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    samples = [0, 257, 32768, 65535, 1000, 65280]
    row = b"\x00" + b"".join(struct.pack(">H", v) for v in samples)
    data = png_bytes(len(samples), 1, bit_depth=16, color_type=0, rows=[row])
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the mode this test is about
    grey = [pixel[0] for pixel in _pixels(_decode(data).image)]
    assert grey == [0, 1, 128, 255, 4, 254]  # round(v * 255 / 65535)


def test_sixteen_bit_grey_with_trns_key() -> None:
    decoded = _decode(_case("mode_I16_ramp_trns_png").data)
    first_column = np.asarray(decoded.image)[:, 0]
    assert (first_column == 255).all()  # sample 0 is the tRNS key: transparent, so white
    assert np.asarray(decoded.image)[0, -1, 0] == 255  # the ramp's top, 65527 -> 255
    assert np.asarray(decoded.image)[0, 1, 0] == 23  # 5957 -> 23


def test_other_modes_decode_to_expected_colours() -> None:
    assert set(_pixels(_decode(_case("mode_1_png").data).image)) == {(255, 255, 255)}
    assert set(_pixels(_decode(_case("mode_LA_png").data).image)) == {(166, 166, 166)}  # 77 @ 128
    assert set(_pixels(_decode(_case("mode_RGB_trns_key_png").data).image)) == {(255, 255, 255)}
    assert set(_pixels(_decode(_case("mode_RGBA16_png").data).image)) == {(255, 127, 127)}  # red @ 50%
    assert set(_pixels(_decode(_case("mode_RGBA_webp").data).image)) == {(255, 255, 255)}  # alpha 0
    cmyk = np.asarray(_decode(_case("mode_CMYK_jpeg").data).image).astype(int)
    assert np.abs(cmyk - [255, 0, 0]).max() <= 3  # C=0 M=255 Y=255 K=0 is red
    grey2 = _pixels(_decode(_case("mode_grey2_png").data).image)[:4]
    assert grey2 == [(0, 0, 0), (85, 85, 85), (170, 170, 170), (255, 255, 255)]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 100, 255], [0, 100, 255]),  # already 8-bit
        ("I", [0, 257, 65535], [0, 1, 255]),  # 16-bit data widened to I
        ("I", [-100, 0, 100], [0, 128, 255]),  # anything else: min..max stretched
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # unit range
        ("F", [0.0, 100.0, 255.0], [0, 100, 255]),
        ("F", [float("nan"), float("inf"), 1.0], [0, 0, 255]),  # non-finite -> 0
        ("F", [-1.0, 0.0, 1.0], [0, 128, 255]),
    ],
)
def test_high_depth_modes_scale_sensibly(mode: str, values: list[float], expected: list[int]) -> None:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert _pixels(rgb) == [(v, v, v) for v in expected]


ALL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
ALL_MODES += ("LAB", "HSV", "I", "I;16", "I;16B", "F")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_to_rgb_accepts_every_mode(mode: str) -> None:
    assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"


def test_to_rgb_does_not_copy_plain_rgb() -> None:
    image = Image.new("RGB", (3, 2))
    assert to_rgb(image) is image


# --------------------------------------------------------------------------------------------------
# EXIF orientation.

# Stored 6x4 with a marker at (0, 0): where the marker lands and the upright size, per orientation.
ORIENTATION_RESULTS = {
    1: ((0, 0), (6, 4)),
    2: ((5, 0), (6, 4)),
    3: ((5, 3), (6, 4)),
    4: ((0, 3), (6, 4)),
    5: ((0, 0), (4, 6)),
    6: ((3, 0), (4, 6)),
    7: ((3, 5), (4, 6)),
    8: ((0, 5), (4, 6)),
}
RED, GREY = (255, 0, 0), (128, 128, 128)


def _oriented(orientation: int, fmt: str = "PNG", size: tuple[int, int] = (6, 4)) -> bytes:
    image = Image.new("RGB", size, GREY)
    image.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_RESULTS))
def test_exif_orientation(orientation: int) -> None:
    data = _oriented(orientation)
    decoded = _decode(data)
    marker, size = ORIENTATION_RESULTS[orientation]
    assert (decoded.width, decoded.height) == size
    assert decoded.image.size == size
    assert decoded.image.getpixel(marker) == RED
    assert sum(1 for pixel in _pixels(decoded.image) if pixel == RED) == 1
    # The same result as Pillow's own exif_transpose on a well-formed file.
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert _pixels(decoded.image) == _pixels(oracle)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATION_RESULTS))
def test_exif_orientation_in_jpeg_and_webp(fmt: str, orientation: int) -> None:
    data = _oriented(orientation, fmt, size=(60, 40))
    decoded = _decode(data)
    expected = (60, 40) if orientation <= 4 else (40, 60)
    assert (decoded.width, decoded.height) == expected == decoded.image.size
    # Pixel for pixel what Pillow's public path gives on a well-formed file.
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=[fmt])).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(oracle))


def test_doubled_exif_header_is_read_as_pillow_reads_it() -> None:
    image = Image.new("RGB", (60, 40), GREY)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(image, "JPEG", exif=b"Exif\x00\x00" + exif.tobytes())  # "Exif\0\0" twice
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=["JPEG"]))
    assert _decode(data).image.size == oracle.size == (40, 60)


@pytest.mark.filterwarnings("error")
def test_corrupt_exif_blocks_neither_warn_nor_refuse() -> None:
    """Photos with damaged EXIF and intact pixels decode (200) without one warning. Pillow's public
    path (`Image.open` + `ImageOps.exif_transpose`) does both for these files: that is why orientation
    is read by app.images itself. If the second half fails, Pillow has changed: reconsider."""
    uploads = corrupt_exif_jpegs(400) + distinct_tag_jpegs(100)
    for data in uploads:
        decoded = _decode(data)
        assert decoded.image.mode == "RGB" and sorted(decoded.image.size) == sorted((decoded.width, decoded.height))
    refused = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in uploads:
            try:
                ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=["JPEG"]))
            except Exception:
                refused += 1
    texts = {str(w.message) for w in caught}
    assert refused > 0 and len(texts) > 100


def test_jpeg_open_skips_pillows_exif_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the one private Pillow hook app.images overrides (`_read_dpi_from_exif`): Pillow's JPEG
    reader parses EXIF while opening and ours must not. Fails if Pillow renames or moves that parse."""
    calls: list[str] = []
    original = Image.Image.getexif

    def getexif(self: Image.Image) -> Image.Exif:
        calls.append(self.format or "")
        return original(self)

    monkeypatch.setattr(Image.Image, "getexif", getexif)
    data = _oriented(6, "JPEG", size=(60, 40))
    JpegImagePlugin.JpegImageFile(io.BytesIO(data))  # positive control: Pillow's reader does parse it
    assert calls == ["JPEG"]
    calls.clear()
    decoded = _decode(data)
    assert calls == [] and decoded.image.size == (40, 60)


def test_xmp_orientation_is_used_without_exif() -> None:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/>'
        b"</rdf:RDF></x:xmpmeta>"
    )
    decoded = _decode(_encode(Image.new("RGB", (60, 40)), "JPEG", xmp=xmp))
    assert (decoded.width, decoded.height) == (40, 60)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b"", None),
        (b"Exif\x00\x00", None),
        (b"Exif\x00\x00II*\x00", None),  # no IFD offset
        (b"Exif\x00\x00XX*\x00\x08\x00\x00\x00", None),  # unknown byte order
        (b"II+\x00\x08\x00\x00\x00\x00\x00", None),  # wrong TIFF magic
        (b"II*\x00\xff\xff\xff\x7f", None),  # IFD offset past the end
        (b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0112, 3, 1, 6), 6),
        (b"MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHIHH", 0x0112, 3, 1, 8, 0), 8),
        (b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0112, 4, 1, 3), 3),  # LONG
        (b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0112, 2, 1, 6), None),  # ASCII
        (b"II*\x00\x08\x00\x00\x00\x05\x00" + struct.pack("<HHII", 0x0100, 3, 1, 6), None),  # runs off
        (b"Exif\x00\x00" * 2 + b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0112, 3, 1, 6), 6),
        (b"Exif\x00\x00" * 3 + b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0112, 3, 1, 6), None),
    ],
)
def test_exif_orientation_reader(block: bytes, expected: int | None) -> None:
    assert images._exif_orientation(block) == expected


def test_upload_key_names_the_bytes() -> None:
    a, b = png_bytes(2, 2, bit_depth=8, color_type=0, rows=[bytes(3)] * 2), _oriented(1)
    assert upload_key(a) == upload_key(bytes(a)) != upload_key(b)
    assert upload_key(a + b"\x00") != upload_key(a)  # any byte changes the key
    # The format the feature cache and benchmarks/ceiling.py rely on: BLAKE2b, 16-byte digest, hex.
    assert upload_key(b"") == hashlib.blake2b(b"", digest_size=16).hexdigest()
    assert len(upload_key(a)) == 32 and int(upload_key(a), 16) >= 0


# --------------------------------------------------------------------------------------------------
# Reduced (draft) JPEG decoding.


@pytest.fixture(scope="module")
def photo_4000x3000() -> bytes:
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)[None, :, None].repeat(3000, axis=0).repeat(3, axis=2)
    return _encode(Image.fromarray(gradient), "JPEG", quality=85)


@pytest.mark.parametrize("min_side", [1, 224, 375, 376, 448, 750, 751, 1500, 1501, 2999, 3000, 5000])
def test_draft_keeps_the_shorter_side_and_reports_full_size(photo_4000x3000: bytes, min_side: int) -> None:
    decoded = _decode(photo_4000x3000, min_side=min_side)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.image.mode == "RGB"
    shorter = min(decoded.image.size)
    assert shorter >= min(min_side, 3000)
    # The largest libjpeg scale that keeps it: 1/8 while 375 >= min_side, then 1/4, 1/2, 1.
    scale = next(s for s in (8, 4, 2, 1) if 3000 // s >= min_side or s == 1)
    assert decoded.image.size == (4000 // scale, 3000 // scale)


def test_draft_224_decodes_an_eighth(photo_4000x3000: bytes) -> None:
    decoded = _decode(photo_4000x3000, min_side=224)
    assert decoded.image.size == (500, 375)
    assert _decode(photo_4000x3000).image.size == (4000, 3000)


def test_draft_with_exif_rotation_reports_upright_full_size() -> None:
    data = _oriented(6, "JPEG", size=(4000, 3000))
    decoded = _decode(data, min_side=224)
    assert (decoded.width, decoded.height) == (3000, 4000)
    assert decoded.image.size == (375, 500)


def test_draft_is_ignored_for_png_and_webp() -> None:
    for fmt in ("PNG", "WEBP"):
        decoded = _decode(_encode(Image.new("RGB", (1600, 1200)), fmt), min_side=224)
        assert decoded.image.size == (1600, 1200)


def test_draft_falls_back_to_full_size_if_pillow_shrinks_too_far(
    photo_4000x3000: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = images._JpegImageFile.draft

    def greedy_draft(self: Image.Image, mode: str | None, size: tuple[int, int] | None) -> object:
        return original(self, mode, (1, 1))  # always 1/8, whatever was asked

    monkeypatch.setattr(images._JpegImageFile, "draft", greedy_draft)
    decoded = _decode(photo_4000x3000, min_side=1000)
    assert decoded.image.size == (4000, 3000)
