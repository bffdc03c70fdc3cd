"""Image intake: upload bytes in, a safe, upright RGB PIL image out; everything else refused.

Pure Pillow/numpy, no HTTP and no torch: the service calls `decode_image` (usually in a worker thread)
and turns the `app.errors` it raises into responses. What the HTTP layer can rely on:

* Formats are recognised from the magic bytes only (`sniff_format`), never from a filename or a
  Content-Type. JPEG, PNG and WebP are accepted; anything else is `UnsupportedMediaType` (415).
* The bytes are parsed only by the Pillow plugin of the sniffed format, never by `Image.open`'s
  format guessing, so a file is never read as a different format than its magic says (the defensive
  check behind that refuses with 415). A polyglot whose sniffed part is a complete image (a PNG with a
  ZIP appended, a JPEG with trailing garbage) is accepted (200): the decoders stop at IEND / EOI, and
  we only use the decoded pixels, never store or re-serve the bytes.
* Too many pixels (width * height > max_pixels) is `PayloadTooLarge` (413), decided from the header
  before any pixel is decoded or any canvas is allocated.
* Empty, truncated, corrupt or otherwise undecodable data is `InvalidImage` (400). Every exception
  Pillow raises while opening or decoding becomes one of these errors; none propagates raw.
* Animated PNG (APNG) and animated WebP: the first frame is used, the rest ignored (200).
* Every decodable mode ends as "RGB"; transparent pixels are composited on white; 16-bit and other
  high-depth data is scaled to 8 bits.
* EXIF orientation is applied; `width`/`height` are the upright size at full resolution, even when a
  JPEG was decoded at reduced scale for speed (`min_side`). A broken EXIF block is ignored.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from app.errors import InvalidImage, PayloadTooLarge, ServiceError, UnsupportedMediaType

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")

# The environment variable that sets `max_pixels` in the service, named in the 413 message.
MAX_PIXELS_SETTING = "PALIGEMMA_MAX_IMAGE_PIXELS"

# `sniff_format` needs this many leading bytes (RIFF size + "WEBP" tag end at byte 12).
SNIFF_BYTES = 16

_ACCEPTED_TEXT = "JPEG, PNG or WebP"
_WHITE = (255, 255, 255, 255)
_REASON_CHARS = 200  # Pillow's message is quoted to the client, but bounded.

# Signatures of formats we refuse, only to tell the client what it sent (the 415 message).
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "ZIP"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload.

    `image` is mode "RGB", upright, possibly reduced (JPEG draft decoding, see `decode_image`);
    `width`/`height` are the upright size of the uploaded image at full resolution.
    """

    image: Image.Image
    width: int
    height: int
    format: str


def upload_key(data: bytes) -> str:
    """The name of an upload's pixels for caches (image features): the same bytes always decode to the
    same image, so a digest of the bytes is the key. 32 hex characters (BLAKE2b, 16-byte digest)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------------
# Format sniffing.


def sniff_format(head: bytes) -> str | None:
    """The accepted format whose magic number `head` starts with ("JPEG", "PNG", "WEBP"), else None.

    Pass at least the first `SNIFF_BYTES` bytes of the upload (WebP needs 12).
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe_unknown(head: bytes) -> str:
    """A short guess at what a refused upload is, so the client sees what we saw."""
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp":  # ISO base media: HEIC, HEIF, AVIF, MP4...
        brand = head[8:12].decode("ascii", "replace").strip()
        return f"ISO media ({brand})"
    if head.startswith(b"RIFF"):
        return f"RIFF {head[8:12].decode('ascii', 'replace')}"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"["):
        return "text (XML/SVG/HTML/JSON)"
    return f"unrecognised bytes {head[:8].hex(' ')}"


# --------------------------------------------------------------------------------------------------
# Decoding.


def decode_image(data: bytes, *, max_pixels: int, min_side: int | None = None) -> DecodedImage:
    """Decode an upload into an upright RGB image, or raise the `app.errors` error that says why not.

    - Empty data -> InvalidImage (400).
    - Not JPEG/PNG/WebP by magic bytes -> UnsupportedMediaType (415).
    - width * height > max_pixels, read from the header before decoding -> PayloadTooLarge (413).
    - Truncated or corrupt -> InvalidImage (400); so is any other exception from Pillow.
    - Animated PNG/WebP: only the first frame is decoded.
    - Transparency is composited on white; 16-bit/I/F data is scaled to 8 bits (`to_rgb`).
    - EXIF orientation is applied (same transpositions as `PIL.ImageOps.exif_transpose`); an
      unreadable EXIF block is ignored.
    - min_side: for JPEG only, decode at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) as long as the
      shorter side stays >= min_side (or the full size, if that is smaller). The reported width and
      height are still the full-resolution upright size. Other formats ignore it.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    if not data:
        raise InvalidImage("the image is empty (0 bytes); send the image file's contents")
    head = bytes(data[:SNIFF_BYTES])
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedMediaType(
            f"unsupported image format ({_describe_unknown(head)}); the accepted formats are "
            f"{_ACCEPTED_TEXT}, recognised from the file's contents; convert the image to one of them",
            param="image",
        )
    _require_strict_truncation()
    try:
        return _decode(bytes(data), fmt, max_pixels, min_side)
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:
        # Only reachable when max_pixels is above Pillow's own hard limit (our check runs first).
        raise PayloadTooLarge(
            f"the {fmt} image exceeds the decoder's pixel limit ({_reason(exc)}); downscale it and retry",
            param="image",
        ) from exc
    except Exception as exc:  # OSError, ValueError, SyntaxError, struct.error, EOFError, MemoryError...
        raise InvalidImage(
            f"the {fmt} image could not be decoded ({_reason(exc)}); it is truncated or corrupt: "
            "re-export or re-download the file and upload it again"
        ) from exc


def _decode(data: bytes, fmt: str, max_pixels: int, min_side: int | None) -> DecodedImage:
    if fmt == "WEBP":
        # libwebp allocates the whole canvas when the file is opened, so check the header first.
        _check_pixels(_webp_canvas_size(data), max_pixels)
    image = _open(data, fmt)
    _check_pixels(image.size, max_pixels)
    full_width, full_height = image.size  # before draft() shrinks it
    if min_side is not None and fmt == "JPEG":
        image = _draft_jpeg(image, data, min_side)
    image.load()  # first frame only, for animated files
    orientation = _orientation(image.info)
    rgb = _apply_orientation(to_rgb(image), orientation)
    if orientation in _SWAPS_SIDES:
        full_width, full_height = full_height, full_width
    return DecodedImage(image=rgb, width=full_width, height=full_height, format=fmt)


def _require_strict_truncation() -> None:
    """Refuse to decode if some code in this process set Pillow's LOAD_TRUNCATED_IMAGES.

    We never set it (it is process-global); with it on, a truncated upload would decode as a
    half-grey image instead of being refused, so this is a server misconfiguration (500).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ServiceError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere in this process; "
            "truncated uploads would be accepted as partly grey images; set it back to False"
        )


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Parse the header (lazily: no pixels) with the plugin of the sniffed format only.

    Not `Image.open`: it guesses among all formats (polyglots), and its decompression-bomb check
    warns or raises against the process-global `Image.MAX_IMAGE_PIXELS` instead of our limit; the
    warning could only be silenced by `warnings.catch_warnings`, which is not thread-safe. Not
    `jpeg_factory` either: it warns on a malformed MPO header; a plain JPEG reader reads the first
    image of an MPO, which is what we want.
    """
    stream = io.BytesIO(data)
    image: ImageFile.ImageFile
    if fmt == "JPEG":
        image = _JpegImageFile(stream)
    elif fmt == "PNG":
        image = PngImagePlugin.PngImageFile(stream)
    else:
        if not WebPImagePlugin.SUPPORTED:
            raise UnsupportedMediaType(
                "this server's Pillow was built without WebP support; send JPEG or PNG", param="image"
            )
        image = WebPImagePlugin.WebPImageFile(stream)
    if image.format != fmt:  # defensive: the plugin chosen by the magic must be the one that read it
        raise UnsupportedMediaType(
            f"the file starts like {fmt} but was read as {image.format}; the accepted formats are "
            f"{_ACCEPTED_TEXT}; re-export the image as one of them",
            param="image",
        )
    return image


class _JpegImageFile(JpegImagePlugin.JpegImageFile):
    """Pillow's JPEG reader without the EXIF parse it runs at open to find a DPI we never use.

    That parse (`Image.getexif`) emits a UserWarning with client-controlled text for every corrupt
    EXIF block and lets some exceptions through, turning a photo with odd metadata into a 400
    (`python -m benchmarks.exif`). Orientation is read by `_orientation` instead.
    """

    # Private hook, kept because Pillow has no public switch for that parse (`Image.open` runs it too);
    # test_jpeg_open_skips_pillows_exif_parse fails if Pillow renames or moves it.

    def _read_dpi_from_exif(self) -> None:
        return


def _check_pixels(size: tuple[int, int] | None, max_pixels: int) -> None:
    """Refuse an image with no pixels (400) or with more than max_pixels (413); None: size unknown."""
    if size is None:
        return
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height}); send an image with content")
    pixels = width * height
    if pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
        fit = f"{max(1, int(width * scale))}x{max(1, int(height * scale))}"
        raise PayloadTooLarge(
            f"image is {width}x{height} = {pixels} pixels; the limit is {max_pixels} "
            f"({MAX_PIXELS_SETTING}); downscale it (for example to {fit}) and retry",
            param="image",
        )


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header (VP8X, VP8L or VP8 chunk), or None if it cannot be read."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _draft_jpeg(image: ImageFile.ImageFile, data: bytes, min_side: int) -> ImageFile.ImageFile:
    """Ask libjpeg to decode at 1/2..1/8 scale while the shorter side stays >= min_side.

    Pillow picks the largest scale s in (8, 4, 2, 1) with s <= min(w // min_side, h // min_side), so
    ceil(side / s) >= min_side already; we still verify, and reopen unscaled if a future Pillow
    disagrees, because a too-small image would silently lose detail.
    """
    shorter = min(image.size)
    image.draft("RGB", (min_side, min_side))
    if min(image.size) >= min(min_side, shorter):
        return image
    return _open(data, "JPEG")


# --------------------------------------------------------------------------------------------------
# EXIF orientation.

# The same transpositions as PIL.ImageOps.exif_transpose.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')


def _orientation(info: dict) -> int:
    """EXIF orientation 1..8 from the decoded file's metadata; 1 when absent, invalid or unreadable.

    Like `getexif()`, XMP `tiff:Orientation` is used when EXIF has no tag.
    """
    # Hand-written rather than `ImageOps.exif_transpose`: on corrupt EXIF Pillow's parser warns with
    # text from the file (a registry entry per text) and sometimes raises (`python -m benchmarks.exif`).
    value = _exif_orientation(_exif_bytes(info))
    if value is None:
        value = _xmp_orientation(info)
    return value if value in _TRANSPOSE else 1


def _exif_bytes(info: dict) -> bytes:
    exif = info.get("exif")
    if isinstance(exif, bytes):
        return exif
    raw_profile = info.get("Raw profile type exif")  # ImageMagick's PNG text chunk: hex after 3 lines
    if isinstance(raw_profile, str):
        try:
            return bytes.fromhex("".join(raw_profile.split("\n")[3:]))
        except ValueError:
            return b""
    return b""


def _exif_orientation(exif: bytes) -> int | None:
    """The Orientation tag of IFD0 in a raw EXIF/TIFF block, or None if absent or unreadable."""
    for _ in range(2):  # the APP1 header, written twice by some tools (Pillow accepts that too)
        exif = exif.removeprefix(b"Exif\x00\x00")
    if len(exif) < 8 or exif[:2] not in (b"II", b"MM"):
        return None
    endian = "<" if exif[:2] == b"II" else ">"
    magic, ifd = struct.unpack_from(endian + "HI", exif, 2)
    if magic != 42 or ifd + 2 > len(exif):
        return None
    (count,) = struct.unpack_from(endian + "H", exif, ifd)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(exif):
            return None  # the directory runs past the block: stop, don't guess
        tag, kind, count_values = struct.unpack_from(endian + "HHI", exif, entry)
        if tag != _ORIENTATION_TAG:
            continue
        if count_values != 1:  # a malformed entry (Pillow skips it too): don't guess
            return None
        if kind == 3:  # SHORT, as the standard says; the value sits at the start of the value field
            return struct.unpack_from(endian + "H", exif, entry + 8)[0]
        if kind == 4:  # LONG, written by some tools
            return struct.unpack_from(endian + "I", exif, entry + 8)[0]
        return None
    return None


def _xmp_orientation(info: dict) -> int | None:
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    if not isinstance(xmp, bytes):
        return None
    match = _XMP_ORIENTATION.search(xmp)
    return int(match[1]) if match else None


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


# --------------------------------------------------------------------------------------------------
# Mode conversion.

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as "RGB".

    Transparency (an alpha band, a palette with transparent entries, a tRNS key colour) is
    composited on white. I;16 is scaled 0..65535 -> 0..255; I and F are scaled by `_scale_to_uint8`.
    An RGB image without transparency is returned as is (no copy).
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_depth_to_l(image)
    if _has_transparency(image):
        return _composite_on_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return "transparency" in image.info or any(band in ("A", "a") for band in image.getbands())


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten on white: out = (c * a + 255 * (255 - a)) / 255, rounded (Pillow's alpha_composite)."""
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    rgba = image.convert("RGBA")  # resolves palettes, tRNS keys and premultiplied RGBa
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float greyscale as 8-bit "L" (or "LA" keeping a tRNS key colour)."""
    values = np.asarray(image)
    grey = _scale_sixteen_bit(values) if image.mode in _SIXTEEN_BIT_MODES else _scale_to_uint8(values)
    result = Image.fromarray(grey)
    key = image.info.get("transparency")
    if isinstance(key, int):  # a PNG tRNS key, in the 16-bit sample units
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        result = Image.merge("LA", (result, alpha))
    return result


def _scale_sixteen_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with rounding (v * 255 / 65535), not a clip of the low byte."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Mode I or F samples to 0..255, guessing the range the data was meant in.

    - floats within 0..1: unit range, times 255;
    - within 0..255: already 8-bit;
    - within 0..65535: 16-bit data widened to I (as some decoders produce), scaled like I;16;
    - anything else (negative, larger): stretched linearly from its min..max.
    Non-finite floats (NaN, inf) become 0.
    """
    data = values.astype(np.float64)
    data[~np.isfinite(data)] = 0.0
    if data.size == 0:
        return data.astype(np.uint8)
    low, high = float(data.min()), float(data.max())
    if low >= 0 and high <= 1.0 and values.dtype.kind == "f":
        data = data * 255.0
    elif low >= 0 and high <= 255:
        pass
    elif low >= 0 and high <= 65535:
        data = data * 255.0 / 65535.0
    else:
        data = (data - low) * 255.0 / (high - low)
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
