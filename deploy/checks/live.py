"""Checks of a running server (deploy/check.sh --build runs them against the container): its /metrics
declares the contract, a test image to send it, and what clients got when it was stopped under load."""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from deploy.checks.promql import all_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A container stopped under load exits within the drain + this: the server's own exit grace (3 s,
# app/__main__.py) and the runtime's teardown of the container.
CONTAINER_EXIT_MARGIN_S = 6.0
# curl's exit codes for a connection that broke instead of answering.
CURL_ERRORS = {7: "connection refused", 28: "timed out", 52: "empty reply", 55: "send failed",
               56: "connection reset"}


def check_exposition(text: str) -> list[str]:
    """A /metrics scrape declares every metric of the contract, and the standard series, with its type."""
    declared = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))
    problems = []
    for name, kind in all_metrics():
        # prometheus_client declares counters with or without _total depending on its version.
        found = declared.get(name) or declared.get(name.removesuffix("_total"))
        if found is None:
            problems.append(f"/metrics does not declare {name}")
        elif found != kind:
            problems.append(f"/metrics declares {name} as {found}, expected {kind}")
    return problems


def make_png(width: int = 64, height: int = 48) -> bytes:
    """A small RGB gradient PNG (the host may have no Pillow)."""
    # Each scanline: filter byte 0, then RGB triples.
    rows = b"".join(b"\x00" + b"".join(bytes((x * 4 % 256, y * 5 % 256, 128)) for x in range(width))
                    for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return PNG_SIGNATURE + body


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG from its header, or None when `data` is not one."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass(frozen=True)
class Answer:
    """What one client got: the HTTP status (0 when none came), curl's exit code and the body."""

    status: int
    curl_exit: int
    body: bytes


def read_answers(directory: Path) -> list[Answer]:
    """The answers deploy/check.sh wrote: N.status ("STATUS CURL_EXIT") beside N.body, per request."""
    answers = []
    for status_file in sorted(directory.glob("*.status")):
        status, curl_exit = status_file.read_text().split()
        body_file = status_file.with_suffix(".body")
        body = body_file.read_bytes() if body_file.exists() else b""
        answers.append(Answer(int(status), int(curl_exit), body))
    return answers


def classify(answer: Answer) -> str:
    """`200`, `503 shutting_down`, or what went wrong (the label the summary counts)."""
    if answer.curl_exit != 0:
        reason = CURL_ERRORS.get(answer.curl_exit, "see man curl")
        return f"no answer: curl exit {answer.curl_exit} ({reason})"
    try:
        body = json.loads(answer.body)
    except ValueError:
        return f"{answer.status} with a body that is not JSON: {answer.body[:60]!r}"
    if answer.status == 200:
        answered = isinstance(body, dict) and isinstance(body.get("text"), str)
        return "200" if answered else f"200 without text: {body}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"{answer.status} without the error envelope"
    kind = error.get("type")
    if answer.status == 503 and kind == "shutting_down" and error.get("message"):
        return "503 shutting_down"
    return f"{answer.status} {kind or 'without the error envelope'}"


def drain_problems(answers: list[Answer], expected: int, exit_code: int, exit_s: float,
                   drain_s: float) -> tuple[str, list[str]]:
    """(summary, problems) of a stop under load: every request answered 200, or 503 with the envelope
    (type shutting_down); the process exited 0 within the drain + CONTAINER_EXIT_MARGIN_S."""
    counts = Counter(classify(answer) for answer in answers)
    limit = drain_s + CONTAINER_EXIT_MARGIN_S
    summary = (", ".join(f"{n} x {label}" for label, n in counts.most_common())
               + f"; exit {exit_code} after {exit_s:.1f} s (limit {limit:g} s)")
    problems = [f"{n} x {label}" for label, n in counts.items() if label not in ("200", "503 shutting_down")]
    if len(answers) != expected:
        problems.append(f"{len(answers)} answers recorded for {expected} requests")
    if exit_code != 0:
        problems.append(f"exit code {exit_code}, not 0")
    if exit_s > limit:
        problems.append(f"exit took {exit_s:.1f} s: more than PALIGEMMA_DRAIN_TIMEOUT_S ({drain_s:g}) + "
                        f"{CONTAINER_EXIT_MARGIN_S:g} s")
    return summary, problems
