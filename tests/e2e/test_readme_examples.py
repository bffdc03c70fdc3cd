"""Every `$ curl ...` example in the README and docs/api.md runs against a served `tiny` model and prints
what the page shows: the same fields, the same structure, the same values, except what a random model
generates (text, boxes), timings and per-request ids. So the docs cannot drift from what the server does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.served import served

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The pages whose examples run here: the README's one per task, and the API reference's.
DOCUMENTED = (README, ROOT / "docs" / "api.md")
DOCUMENTED_URL = "http://localhost:8000"

# Values that differ from run to run (memory_bytes: what the machine has free at start-up), or that a
# model with random weights makes up.
VARYING = {"timings", "request_id", "id", "created", "memory_bytes"}
GENERATED = {"raw_text", "text", "answer", "content", "detections", "segments", "dropped", "completion_tokens",
             "total_tokens", "finish_reason"}


def examples(pages: tuple[Path, ...] = DOCUMENTED) -> list[tuple[str, str]]:
    """(command, documented output) for every `$ ` line of the pages' sh blocks."""
    found = []
    for page in pages:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
            parts = re.split(r"(?m)^\$ ", block)
            for part in parts[1:]:
                command, _, output = part.partition("\n")
                found.append((command, output.strip()))
    return found


def _shape(value: Any, key: str | None = None) -> Any:
    if key in VARYING or key in GENERATED:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        return {k: _shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


def normalised(output: str) -> Any:
    """JSON as its shape; a server-sent event stream as its event kinds and the shape of its data."""
    if output.startswith("{"):
        return _shape(json.loads(output))
    events = []
    for block in output.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("event") == "delta":
            if not events or events[-1] != "delta":  # how many deltas depends on the generated text
                events.append("delta")
        elif fields:
            events.append((fields.get("event"), _shape(json.loads(fields["data"]))))
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (Debian package `curl`)")
    with served(tmp_path_factory.mktemp("readme")) as s:
        yield s


def test_the_readme_has_an_example_for_every_task():
    commands = " ".join(command for command, _ in examples((README,)))
    for path in ("/v1/caption", "/v1/vqa", "/v1/ocr", "/v1/detect", "/v1/segment", "/v1/generate",
                 "--form-string"):
        assert path in commands, path


def test_the_api_reference_has_examples_of_streaming_json_chat_and_errors():
    commands = " ".join(command for command, _ in examples((DOCUMENTED[1],)))
    for path in ("/v1/chat/completions", "/v1/models", "stream=true", "Content-Type: application/json",
                 "seed="):
        assert path in commands, path


@pytest.mark.parametrize(("command", "documented"), examples(), ids=[c[:60] for c, _ in examples()])
def test_each_example_prints_what_the_docs_show(server, command, documented):
    run = subprocess.run(["bash", "-c", command.replace(DOCUMENTED_URL, server.url)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert normalised(run.stdout.strip()) == normalised(documented)
