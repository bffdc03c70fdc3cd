"""Bad and tricky image uploads, generated in memory and deterministically.

`bad_inputs()` returns the catalogue; each `BadInput` carries the status the whole HTTP service must
answer for it at the default pixel cap (`DEFAULT_MAX_PIXELS`):

* 400: not decodable (empty, truncated, corrupt, no pixels);
* 413: more pixels than the cap, refused from the header before decoding;
* 415: not JPEG, PNG or WebP by magic bytes (whatever the filename or Content-Type say);
* 200: accepted; `expected_size` is the reported upright (width, height) where one is known.

Decisions recorded here (see also `app.images`):

* A JPEG with trailing garbage after EOI, and a PNG with a ZIP archive appended (a PNG/ZIP polyglot),
  are accepted (200): the decoders stop at EOI / IEND and only the pixels are used; we never store or
  re-serve the bytes, so the appended part is inert. Browsers and most servers accept them too.
* Animated PNG / WebP: 200, the first frame is used.
* Pillow modes I (32-bit int) and F (float) cannot be stored in JPEG, PNG or WebP (a 16-bit grey PNG
  decodes as I;16), so they have no upload here; `tests/unit/test_images.py` checks them via `to_rgb`.

No pytest import: the HTTP tests can reuse this module.
"""

from __future__ import annotations

import functools
import io
import json
import random
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

DEFAULT_MAX_PIXELS = 50_000_000

_SEED = 20240611  # every random byte below comes from this seed


@dataclass(frozen=True)
class BadInput:
    name: str
    data: bytes
    expected_status: int
    note: str
    expected_size: tuple[int, int] | None = None  # upright (width, height) for 200 cases


# --------------------------------------------------------------------------------------------------
# Builders.


def _rng(salt: int) -> random.Random:
    return random.Random(_SEED + salt)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(mode: str, size: tuple[int, int], salt: int) -> Image.Image:
    """Incompressible content, so that cutting a file in half cuts into the pixel data."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    raw = _rng(salt).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, raw)


def _chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _ihdr(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    return struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)


def png_bytes(
    width: int,
    height: int,
    *,
    bit_depth: int,
    color_type: int,
    rows: Iterable[bytes] = (),
    idat: bytes | None = None,
    extra_chunks: Iterable[tuple[bytes, bytes]] = (),
    ihdr_crc: int | None = None,
) -> bytes:
    """A PNG written by hand: IHDR, extra chunks, IDAT (from filtered `rows` or given), IEND.

    Lets us declare sizes and depths Pillow would not write (100000x100000, 16-bit RGBA, tRNS keys).
    Each row in `rows` must already start with its filter byte. Rows are compressed as a stream, so
    a huge all-zero image never exists uncompressed in memory.
    """
    if idat is None:
        compressor = zlib.compressobj(9)
        idat = b"".join(compressor.compress(row) for row in rows) + compressor.flush()
    body = _chunk(b"IHDR", _ihdr(width, height, bit_depth, color_type), ihdr_crc)
    body += b"".join(_chunk(kind, payload) for kind, payload in extra_chunks)
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _jpeg(size: tuple[int, int] = (64, 48), salt: int = 0, **options: object) -> bytes:
    image = Image.new("RGB", size, (40, 120, 200))
    image.paste(_noise("RGB", (size[0] // 2, size[1] // 2), salt))
    return _encode(image, "JPEG", quality=90, **options)


def _insert_after_soi(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    segment = struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


def _find_marker(jpeg: bytes, marker: int) -> int:
    index = jpeg.find(bytes((0xFF, marker)))
    if index < 0:
        raise AssertionError(f"marker FF{marker:02X} not found")
    return index


def _with_orientation(image: Image.Image, fmt: str, orientation: int, **options: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, fmt, exif=exif.tobytes(), **options)


def _webp_vp8x(width: int, height: int, inner: bytes) -> bytes:
    """A WebP with a VP8X header declaring a width x height canvas around `inner`'s bitstream chunk."""
    vp8x = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunks = _riff_chunk(b"VP8X", vp8x) + inner[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + pad


def _zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo("payload.txt", date_time=(2024, 1, 1, 0, 0, 0))
        archive.writestr(info, "this archive rides behind a PNG\n" * 20)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Cases by outcome.


def _unsupported() -> list[BadInput]:
    small = Image.new("RGB", (8, 8), (10, 200, 30))
    random_bytes = b"\x00" + _rng(1).randbytes(1023)  # the leading 0 rules out every magic we accept
    heic = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)
    avif = struct.pack(">I", 28) + b"ftypavif" + bytes(4) + b"avifmif1miaf" + bytes(64)
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    jpeg = _jpeg()
    riff_wave = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(28)
    return [
        BadInput("random_bytes", random_bytes, 415, "1 KiB of noise"),
        BadInput("text", b"hello, this is not an image\n", 415, "plain text"),
        BadInput("json", json.dumps({"image": "cat.jpg"}).encode(), 415, "a JSON body"),
        BadInput("html", b"<!DOCTYPE html><html><body><img src=x></body></html>", 415, "HTML"),
        BadInput("svg", svg, 415, "vector images are not decoded"),
        BadInput("pdf_header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415, "PDF"),
        BadInput("gif", _encode(small, "GIF"), 415, "GIF is not accepted"),
        BadInput("bmp", _encode(small, "BMP"), 415, "BMP"),
        BadInput("tiff", _encode(small, "TIFF"), 415, "TIFF"),
        BadInput("ico", _encode(small, "ICO"), 415, "ICO"),
        BadInput("heic_ftyp", heic, 415, "HEIC-like ISO-BMFF header"),
        BadInput("avif_ftyp", avif, 415, "AVIF-like ISO-BMFF header"),
        BadInput("riff_wave", riff_wave, 415, "RIFF container, but WAVE audio, not WEBP"),
        BadInput("jpeg_wrong_magic", b"\x00" + jpeg[1:], 415, "a JPEG whose first byte was altered"),
    ]


def _unreadable() -> list[BadInput]:
    png = _encode(_noise("RGB", (64, 64), 2), "PNG")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR CRC: 8 (signature) + 4 (length) + 4 (type) + 13 (data)
    jpeg = _jpeg((128, 96), salt=3)
    sos = _find_marker(jpeg, 0xDA)
    sos_end = sos + 2 + struct.unpack(">H", jpeg[sos + 2 : sos + 4])[0]
    webp = _encode(_noise("RGB", (64, 64), 4), "WEBP", quality=80)
    zero_width = png_bytes(0, 10, bit_depth=8, color_type=0, rows=[b"\x00"] * 10)
    corrupt_idat = png_bytes(16, 16, bit_depth=8, color_type=0, idat=_rng(5).randbytes(200))
    webp_unknown = b"RIFF" + struct.pack("<I", 20) + b"WEBPVP8Z" + struct.pack("<I", 8) + bytes(8)
    return [
        BadInput("empty", b"", 400, "0 bytes"),
        BadInput("png_bad_ihdr_crc", bytes(bad_crc), 400, "IHDR checksum does not match"),
        BadInput("png_truncated_half", png[: len(png) // 2], 400, "cut in the middle of IDAT"),
        BadInput("png_signature_only", png[:8], 400, "the 8-byte signature and nothing else"),
        BadInput("png_zero_width", zero_width, 400, "IHDR declares 0x10"),
        BadInput("png_corrupt_idat", corrupt_idat, 400, "IDAT is not a zlib stream (CRC is right)"),
        BadInput("jpeg_truncated_after_header", jpeg[:sos_end], 400, "ends right after the SOS header"),
        BadInput("jpeg_truncated_before_sos", jpeg[:sos], 400, "tables but no scan"),
        BadInput("jpeg_truncated_half", jpeg[: len(jpeg) // 2], 400, "cut in the entropy-coded data"),
        BadInput("jpeg_soi_eoi", b"\xff\xd8\xff\xd9", 400, "start and end markers only"),
        BadInput("webp_truncated", webp[: len(webp) // 2], 400, "WebP cut in half"),
        BadInput("webp_unknown_chunk", webp_unknown, 400, "RIFF/WEBP with no VP8/VP8L/VP8X chunk"),
    ]


def _too_many_pixels() -> list[BadInput]:
    # 100000 x 100000 declared, one row of data: only the header is ever read.
    header_bomb = png_bytes(100_000, 100_000, bit_depth=8, color_type=0, rows=[bytes(100_001)])
    # 20000 x 20000 1-bit black, complete and valid: 50 MB of zero rows deflate to ~50 KB.
    zip_bomb = png_bytes(20_000, 20_000, bit_depth=1, color_type=0, rows=_zero_rows(2_501, 20_000))
    jpeg = bytearray(_jpeg())
    sof = _find_marker(bytes(jpeg), 0xC0)
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # SOF0: height, width
    lossless = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), "WEBP", lossless=True)
    webp_canvas = _webp_vp8x(20_000, 20_000, lossless)
    return [
        BadInput("png_header_bomb_100000", header_bomb, 413, "IHDR says 100000x100000; tiny file"),
        BadInput("png_zip_bomb_20000", zip_bomb, 413, "valid 20000x20000 1-bit PNG of ~50 KB"),
        BadInput("jpeg_sof_bomb_60000", bytes(jpeg), 413, "SOF0 patched to 60000x60000"),
        BadInput("webp_canvas_bomb_20000", webp_canvas, 413, "VP8X canvas 20000x20000 over a 16x16 frame"),
    ]


def _zero_rows(row_bytes: int, count: int) -> Iterable[bytes]:
    row = bytes(row_bytes)  # filter byte 0 + zero samples
    for _ in range(count):
        yield row


def _accepted_tricky() -> list[BadInput]:
    jpeg = _jpeg((64, 48), salt=6)
    short_idat = png_bytes(16, 16, bit_depth=8, color_type=0, rows=[bytes(17)] * 4)
    png = _encode(_noise("RGB", (32, 24), 7), "PNG")
    frames = [Image.new("RGB", (5, 4), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    apng = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    awebp = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    rotated = _with_orientation(Image.new("RGB", (40, 20), (0, 90, 0)), "JPEG", 6)
    garbage_exif = _insert_after_soi(jpeg, 0xE1, b"Exif\x00\x00" + _rng(8).randbytes(64))
    # IFD0 claims 0xFFFF entries, the first being Orientation=6 with a count past the end.
    runaway_ifd = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + struct.pack("<HHII", 0x0112, 3, 0xFFFF, 6)
    runaway_exif = _insert_after_soi(jpeg, 0xE1, runaway_ifd)
    return [
        BadInput(
            "png_zip_polyglot", png + _zip_archive(), 200, "PNG + appended ZIP: PNG part used", (32, 24)
        ),
        BadInput(
            "jpeg_trailing_garbage", jpeg + _rng(9).randbytes(1024), 200, "bytes after EOI ignored", (64, 48)
        ),
        BadInput("apng_animated", apng, 200, "3-frame APNG: first frame (red)", (5, 4)),
        BadInput("webp_animated", awebp, 200, "3-frame WebP: first frame (red)", (5, 4)),
        BadInput("jpeg_exif_orientation_6", rotated, 200, "stored 40x20, displayed 20x40", (20, 40)),
        BadInput(
            "jpeg_exif_orientation_invalid",
            _with_orientation(Image.new("RGB", (40, 20)), "JPEG", 9),
            200,
            "orientation 9 does not exist: ignored",
            (40, 20),
        ),
        BadInput("jpeg_broken_exif_garbage", garbage_exif, 200, "APP1 Exif of noise: ignored", (64, 48)),
        BadInput(
            "jpeg_broken_exif_runaway_ifd", runaway_exif, 200, "bogus Orientation count: ignored", (64, 48)
        ),
        # Honest leniency: a well-formed zlib stream that ends early is not an error to Pillow; the
        # missing rows decode as black (browsers also show such files). Not worth a second inflate.
        BadInput("png_short_idat", short_idat, 200, "IDAT holds 4 of 16 rows: rest black", (16, 16)),
        BadInput(
            "png_1x1", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 200, "smallest image", (1, 1)
        ),
        BadInput(
            "png_10000x1",
            _encode(Image.new("L", (10_000, 1), 128), "PNG"),
            200,
            "extreme aspect ratio, 10000 pixels",
            (10_000, 1),
        ),
        BadInput(
            "jpeg_progressive", _jpeg((64, 48), salt=10, progressive=True), 200, "progressive scan", (64, 48)
        ),
        BadInput(
            "webp_lossy_rgb", _encode(_noise("RGB", (30, 20), 11), "WEBP", quality=80), 200, "VP8", (30, 20)
        ),
    ]


def _modes() -> list[BadInput]:
    size = (12, 8)
    palette = Image.new("P", size)
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    palette_trns = palette.copy()
    palette_trns.info["transparency"] = bytes([255, 0, 128])
    row16 = b"\x00" + b"".join(struct.pack(">H", v) for v in range(0, 65536, 65535 // 11)[: size[0]])
    rgba16_row = b"\x00" + struct.pack(">HHHH", 65535, 0, 0, 32768) * size[0]
    grey2_rows = [b"\x00" + bytes([0b00011011, 0b11100100, 0b01010101])] * size[1]
    cases: list[tuple[str, bytes, str]] = [
        ("mode_1_png", _encode(Image.new("1", size, 1), "PNG"), "1-bit"),
        ("mode_L_png", _encode(Image.new("L", size, 77), "PNG"), "8-bit grey"),
        ("mode_LA_png", _encode(Image.new("LA", size, (77, 128)), "PNG"), "grey + alpha"),
        ("mode_P_png", _encode(palette, "PNG"), "palette"),
        (
            "mode_P_transparency_png",
            _encode(palette_trns, "PNG", transparency=bytes([255, 0, 128])),
            "palette with tRNS alphas",
        ),
        ("mode_RGB_png", _encode(Image.new("RGB", size, (1, 2, 3)), "PNG"), "RGB"),
        (
            "mode_RGB_trns_key_png",
            _encode(Image.new("RGB", size, (1, 2, 3)), "PNG", transparency=(1, 2, 3)),
            "RGB with a tRNS key colour",
        ),
        ("mode_RGBA_png", _encode(Image.new("RGBA", size, (10, 20, 30, 40)), "PNG"), "RGBA"),
        ("mode_I16_png", _encode(Image.new("I;16", size, 40000), "PNG"), "16-bit grey (decodes as I;16)"),
        (
            "mode_I16_ramp_trns_png",
            png_bytes(
                *size,
                bit_depth=16,
                color_type=0,
                rows=[row16] * size[1],
                extra_chunks=[(b"tRNS", struct.pack(">H", 0))],
            ),
            "16-bit grey ramp with a tRNS key",
        ),
        (
            "mode_RGBA16_png",
            png_bytes(*size, bit_depth=16, color_type=6, rows=[rgba16_row] * size[1]),
            "16-bit RGBA",
        ),
        ("mode_grey2_png", png_bytes(*size, bit_depth=2, color_type=0, rows=grey2_rows), "2-bit grey"),
        ("mode_L_jpeg", _encode(Image.new("L", size, 200), "JPEG"), "greyscale JPEG"),
        ("mode_RGB_jpeg", _jpeg(size), "RGB JPEG"),
        ("mode_CMYK_jpeg", _encode(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG"), "Adobe CMYK JPEG"),
        (
            "mode_YCbCr_jpeg",
            _encode(Image.new("YCbCr", size, (128, 100, 150)), "JPEG"),
            "saved from YCbCr (decodes as RGB)",
        ),
        (
            "mode_RGBA_webp",
            _encode(Image.new("RGBA", size, (10, 20, 30, 0)), "WEBP", lossless=True),
            "lossless WebP with alpha",
        ),
    ]
    return [BadInput(name, data, 200, note, size) for name, data, note in cases]


def corrupt_exif_jpegs(count: int, seed: int = 3) -> list[bytes]:
    """`count` 40x20 JPEGs (a marker in the top-left corner, so flips show) whose EXIF block, holding an
    Orientation and two strings, has 1-3 bytes changed or is cut short: intact pixels, damaged metadata."""
    rng = random.Random(_SEED + seed)
    image = Image.new("RGB", (40, 20), (0, 90, 0))
    image.paste((250, 250, 250), (0, 0, 10, 5))
    jpeg = _encode(image, "JPEG", quality=85)
    blocks = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112], exif[0x010F], exif[0x0131] = orientation, "Maker", "Software 1.0"
        blocks.append(exif.tobytes())  # starts with the APP1 "Exif\0\0" header
    uploads = []
    for _ in range(count):
        block = bytearray(rng.choice(blocks))
        action = rng.randrange(3)
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(6, len(block))
            if action == 0:
                block[where] = rng.randrange(256)
            elif action == 1:
                block[where] = rng.choice([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF])
            else:
                del block[where:]
                break
        uploads.append(_insert_after_soi(jpeg, 0xE1, bytes(block)))
    return uploads


def distinct_tag_jpegs(count: int) -> list[bytes]:
    """JPEGs whose EXIF IFD0 has one entry with its data past the end of the block, a different tag
    number in each: Pillow warns "Tag data larger than file. Skipping tag N" with a new text each time."""
    jpeg = _jpeg((16, 16))
    head = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00"
    return [_insert_after_soi(jpeg, 0xE1, head + struct.pack("<HHII", tag, 2, 1000, 26) + bytes(4))
            for tag in range(1000, 1000 + count)]


@functools.lru_cache(maxsize=1)
def bad_inputs() -> tuple[BadInput, ...]:
    """Every case, in a fixed order; built once per process (the zip bomb takes ~0.3 s)."""
    cases = _unsupported() + _unreadable() + _too_many_pixels() + _accepted_tricky() + _modes()
    names = [case.name for case in cases]
    if len(names) != len(set(names)):
        raise AssertionError("duplicate BadInput names")
    return tuple(cases)
