"""Images sent inline in a JSON body: base64, or a base64 data URL, decoded to bytes under a size limit.

* base64, standard alphabet (`+/`); padding optional, ASCII whitespace and newlines ignored.
* a data URL whose payload is base64: `data:image/png;base64,...` (any `image/*` type, or
  `application/octet-stream`). The bytes are recognised later by their magic, not by this media type.

The size is checked on the encoded length before anything is decoded: 413 over
`PALIGEMMA_MAX_IMAGE_BYTES`; a malformed value is a 400 that says what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import re

from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge

MAX_BYTES_SETTING = "PALIGEMMA_MAX_IMAGE_BYTES"

# Every form of `image` a client may send, for messages that refuse one.
ACCEPTED_FORMS = ("send the image as a file field `image` (multipart/form-data), or in JSON as base64, as a "
                  "data URL (data:image/png;base64,...) or as an http(s) URL of a host the server allows")

SPACES = " \t\n\r\f\v"  # ASCII whitespace; str.strip() would also drop \x1c-\x1f and Unicode spaces
_WHITESPACE = SPACES.encode()
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_STRAY = re.compile(r"[^A-Za-z0-9+/= \t\n\r\f\v]")
_INNER_PADDING = re.compile(r"=+[ \t\n\r\f\v]*[^= \t\n\r\f\v]")
_DATA_URL = re.compile(r"data:([^,]{0,256}),", re.IGNORECASE)


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or a base64 data URL, at most `max_bytes` of them.

    Raises PayloadTooLarge (413) when the decoded size would be over `max_bytes` (known from the
    length, before decoding), InvalidImage (400) when empty, InvalidRequest (400) when malformed."""
    text = value.strip(SPACES)
    if text[:5].lower() == "data:":
        text = _data_url_payload(text)
    # Base64 is 4 characters for 3 bytes; the slack lets MIME-style line breaks through.
    if len(text) > _encoded_length(max_bytes) * 2 + 1024:
        raise too_large(f"the base64 in `image` ({len(text)} characters) holds more than", max_bytes)
    try:
        compact = text.encode("ascii").translate(None, _WHITESPACE)
    except UnicodeEncodeError as exc:
        raise _not_base64(f"it holds the non-ASCII character {text[exc.start]!r}") from None
    body = compact.rstrip(b"=")
    padding = len(compact) - len(body)
    if not body:
        raise InvalidImage("the image is empty (no base64 data); " + ACCEPTED_FORMS)
    size = len(body) * 3 // 4
    if size > max_bytes:
        raise too_large(f"the base64 in `image` decodes to {size} bytes, over", max_bytes)
    if body.translate(None, _ALPHABET):  # what is left is not base64 (a fast C pass; the search is not)
        raise _not_base64(_first_stray_character(text))
    if len(body) % 4 == 1 or (padding and padding != -len(body) % 4):
        raise _not_base64(f"its length or padding is wrong ({len(body)} characters, then {padding} `=`)")
    try:
        data = base64.b64decode(body + b"=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:  # not expected after the checks above; refused all the same
        raise _not_base64(str(exc)) from None
    if len(data) > max_bytes:  # cannot happen given the length check; kept as the contract's guard
        raise too_large(f"the image is {len(data)} bytes, over", max_bytes)
    return data


def _first_stray_character(text: str) -> str:
    stray = _STRAY.search(text)
    if stray is None:  # the alphabet is fine, so an `=` comes before more data
        stray = _INNER_PADDING.search(text)
        assert stray is not None
        return f"padding (`=`) comes before more data at character {stray.start()}"
    if stray.group() in "-_":
        return "it uses the URL-safe alphabet (- and _); use the standard one (+ and /)"
    return f"it holds {stray.group()!r} at character {stray.start()}"


def _data_url_payload(text: str) -> str:
    header = _DATA_URL.match(text)
    if header is None:
        raise InvalidRequest("`image` starts with `data:` but has no `,` before its data; write "
                             "data:image/png;base64,<base64>. " + ACCEPTED_FORMS, param="image")
    media_type, *parameters = (part.strip().lower() for part in header.group(1).split(";"))
    if not parameters or parameters[-1] != "base64":
        raise InvalidRequest("`image` is a data URL without `;base64`; only base64 data URLs are accepted "
                             "(data:image/png;base64,...)", param="image")
    if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise InvalidRequest(f"`image` is a data URL of type {media_type or '(none)'!r}; use an image type "
                             "(data:image/png;base64,...) or application/octet-stream", param="image")
    return text[header.end():]


def _encoded_length(size: int) -> int:
    return 4 * -(-size // 3)


def _not_base64(reason: str) -> InvalidRequest:
    return InvalidRequest(f"`image` is not valid base64: {reason}. " + ACCEPTED_FORMS, param="image")


def too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} the limit of {limit} bytes ({MAX_BYTES_SETTING}); send a smaller or more "
                           "compressed image", param="image")
