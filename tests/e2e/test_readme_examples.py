"""Every `$ curl ...` example in the README and docs/api.md runs against a served `tiny` model and prints
what the page shows: the same fields, the same structure, the same values, except what a random model
generates (text, boxes), timings and per-request ids. Blocks that start with `# PALIGEMMA_MODEL=demo` run
against the built-in demo model instead, and there what it answers must match too (boxes to a pixel).
So the docs cannot drift from what the server does."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.served import served

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The pages whose examples run here: the README's one per task, and the API reference's.
DOCUMENTED = (README, ROOT / "docs" / "api.md")
DOCUMENTED_URL = "http://localhost:8000"

# The first line of a block whose examples run against the demo model.
DEMO_BLOCK = "# PALIGEMMA_MODEL=demo"

# Values that differ from run to run (memory_bytes: what the machine has free at start-up), or that a
# model with random weights makes up.
VARYING = {"timings", "request_id", "id", "created", "memory_bytes"}
GENERATED = {"raw_text", "text", "answer", "content", "detections", "segments", "dropped", "completion_tokens",
             "total_tokens", "finish_reason"}


def examples(pages: tuple[Path, ...] = DOCUMENTED) -> list[tuple[str, str, str]]:
    """(command, documented output, model) for every `$ ` line of the pages' sh blocks."""
    found = []
    for page in pages:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
            model = "demo" if block.startswith(DEMO_BLOCK) else "tiny"
            parts = re.split(r"(?m)^\$ ", block)
            for part in parts[1:]:
                command, _, output = part.partition("\n")
                found.append((command, output.strip(), model))
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


def same_answer(got: Any, shown: Any, key: str | None = None) -> bool:
    """Whether the demo model answered what the page shows: every text and label as it is, every box
    coordinate to within a pixel, timings and ids aside. The raw text, the mask's run lengths and area
    are left to the boxes: a loc bin or an edge pixel may differ between CPUs."""
    if key in VARYING or key in ("raw_text", "counts", "mask_area", "box_normalized"):
        return True
    if isinstance(got, dict) and isinstance(shown, dict):
        return got.keys() == shown.keys() and all(same_answer(got[k], shown[k], k) for k in got)
    if isinstance(got, list) and isinstance(shown, list):
        return len(got) == len(shown) and all(same_answer(g, s) for g, s in zip(got, shown, strict=True))
    if isinstance(got, float) and isinstance(shown, (int, float)):
        return abs(got - shown) <= 1.0
    return got == shown


def _server(tmp_path_factory, model: str):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (Debian package `curl`)")
    return served(tmp_path_factory.mktemp(f"readme-{model}"), env={"PALIGEMMA_MODEL": model})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _server(tmp_path_factory, "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with _server(tmp_path_factory, "demo") as s:
        yield s


def test_the_readme_has_an_example_for_every_task():
    commands = " ".join(command for command, _, _ in examples((README,)))
    for path in ("/v1/caption", "/v1/vqa", "/v1/ocr", "/v1/detect", "/v1/segment", "/v1/generate",
                 "--form-string"):
        assert path in commands, path


def test_the_api_reference_has_examples_of_streaming_json_chat_and_errors():
    commands = " ".join(command for command, _, _ in examples((DOCUMENTED[1],)))
    for path in ("/v1/chat/completions", "/v1/models", "stream=true", "Content-Type: application/json",
                 "seed="):
        assert path in commands, path


def test_the_readme_shows_the_demo_detecting_and_segmenting():
    commands = " ".join(command for command, _, model in examples((README,)) if model == "demo")
    assert "/v1/detect" in commands and "/v1/segment" in commands


@pytest.mark.parametrize(("command", "documented", "model"), examples(), ids=[c[:60] for c, _, _ in examples()])
def test_each_example_prints_what_the_docs_show(request, command, documented, model):
    server = request.getfixturevalue("demo_server" if model == "demo" else "server")
    run = subprocess.run(["bash", "-c", command.replace(DOCUMENTED_URL, server.url)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert normalised(run.stdout.strip()) == normalised(documented)
    if model == "demo":
        assert same_answer(json.loads(run.stdout), json.loads(documented)), run.stdout


# The README's picture of the demo block's segment answer, as the server draws it (`Accept: image/png`).
DEMO_PICTURE = ROOT / "docs" / "demo-segment.png"


def test_the_readme_picture_is_what_the_demo_server_draws(demo_server):
    assert f"]({DEMO_PICTURE.relative_to(ROOT)})" in README.read_text()
    [command] = [c for c, _, model in examples((README,)) if model == "demo" and "/v1/segment" in c]
    image = re.search(r"image=@(\S+)", command).group(1)
    objects = re.search(r'"objects=([^"]+)"', command).group(1)
    response = httpx.post(f"{demo_server.url}/v1/segment", headers={"Accept": "image/png"}, timeout=60,
                          files={"image": (image, (ROOT / image).read_bytes(), "image/png")},
                          data={"objects": objects})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
    shown = np.asarray(Image.open(DEMO_PICTURE).convert("RGB"), dtype=np.int16)
    assert drawn.shape == shown.shape
    # A box edge or a mask's edge pixel may move by one between CPUs (as the boxes above, to a pixel).
    differing = (np.abs(drawn - shown).max(axis=2) > 8).mean()
    assert differing < 0.02, differing
