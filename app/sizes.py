"""Sizes in bytes, read from and written for people: `24GiB` in a setting, `3.52 GiB` in a table."""

from __future__ import annotations

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """`24GiB`, `80 GB`, `1.5TiB`, `123456` -> bytes (GB = 10^9, GiB = 2^30: GPU memory is sold in GiB)."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size: give e.g. 24GiB, 80GB or a number of bytes")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give e.g. 24GiB, 80GB or a number of bytes") from None
    if amount <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return int(amount * _UNITS[unit])


def gib(size: int | None) -> str:
    if size is None:
        return "?"
    if abs(size) < 2**30:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**30:.2f} GiB"
