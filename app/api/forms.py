"""Strict text fields in multipart bodies.

Starlette decodes a text field that is not valid UTF-8 as Latin-1 instead of refusing it, so a client
sending bytes in another encoding would get a prompt full of mojibake and a 200. The strict parser
refuses such a field; Starlette turns the refusal into a 400 (our envelope), naming the field.
"""

from __future__ import annotations

import starlette.requests
from starlette.formparsers import MultiPartException, MultiPartParser


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                raise MultiPartException(f"`{part.field_name}` must be UTF-8 text.") from None
        super().on_part_end()


def use_strict_multipart() -> None:
    """Make every request's form parsing strict (Request looks the parser class up at parse time)."""
    starlette.requests.MultiPartParser = StrictMultiPartParser  # type: ignore[misc]
