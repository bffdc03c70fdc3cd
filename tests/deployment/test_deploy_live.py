"""What deploy/check.sh --build holds the running container to: a test PNG, the annotated PNG it
answers, and the answers clients get when it is stopped under load."""

from __future__ import annotations

import io
import json
import sys

import pytest

from app.api.errors import service_error_response
from app.errors import DeadlineExceeded, ShuttingDown
from deploy.checks import live, render_probe
from tests.deployment.tooling import run

SHUTTING_DOWN = bytes(service_error_response(
    ShuttingDown("the server shut down before this request finished; retry on another replica"), "r1").body)


def test_test_png_is_a_valid_image():
    png = live.make_png(8, 4)
    assert live.png_size(png) == (8, 4)
    image_module = pytest.importorskip("PIL.Image")
    image = image_module.open(io.BytesIO(png))
    image.load()
    assert image.size == (8, 4)


def test_png_size_refuses_what_is_not_a_png():
    assert live.png_size(b'{"error": {}}') is None
    assert live.png_size(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20) is None


@pytest.mark.parametrize(("answer", "label"), [
    (live.Answer(200, 0, b'{"text": "a cat", "model": "tiny"}'), "200"),
    (live.Answer(503, 0, SHUTTING_DOWN), "503 shutting_down"),
    # What the server answered before its drain kept its deadline (issue 12): uvicorn's plain text.
    (live.Answer(500, 0, b"Internal Server Error"), "500 with a body that is not JSON: b'Internal Server Error'"),
    (live.Answer(504, 0, bytes(service_error_response(DeadlineExceeded("too late"), None).body)), "504 timeout"),
    (live.Answer(503, 0, b'{"detail": "Service Unavailable"}'), "503 without the error envelope"),
    (live.Answer(0, 56, b""), "no answer: curl exit 56 (connection reset)"),
    (live.Answer(0, 52, b""), "no answer: curl exit 52 (empty reply)"),
])
def test_each_answer_is_classified(answer, label):
    assert live.classify(answer) == label


def test_a_drain_with_only_answers_and_envelopes_passes_and_anything_else_fails():
    good = [live.Answer(200, 0, b'{"text": ""}')] * 9 + [live.Answer(503, 0, SHUTTING_DOWN)] * 55
    summary, problems = live.drain_problems(good, 64, exit_code=0, exit_s=5.2, drain_s=4)
    assert (summary, problems) == ("55 x 503 shutting_down, 9 x 200; exit 0 after 5.2 s (limit 10 s)", [])
    bad = [*good[:-2], live.Answer(500, 0, b"Internal Server Error"), live.Answer(0, 56, b"")]
    _, problems = live.drain_problems(bad, 64, exit_code=137, exit_s=18.9, drain_s=4)
    assert problems == ["1 x 500 with a body that is not JSON: b'Internal Server Error'",
                        "1 x no answer: curl exit 56 (connection reset)", "exit code 137, not 0",
                        "exit took 18.9 s: more than PALIGEMMA_DRAIN_TIMEOUT_S (4) + 6 s"]
    _, problems = live.drain_problems(good[:60], 64, exit_code=0, exit_s=5, drain_s=4)
    assert problems == ["60 answers recorded for 64 requests"]


def test_drain_outcome_command_reads_what_check_sh_writes(tmp_path):
    # deploy/check.sh: one N.status ("HTTP_CODE CURL_EXIT") and N.body per request.
    answers = {1: ("200 0", json.dumps({"text": "x"}).encode()), 2: ("503 0", SHUTTING_DOWN), 3: ("000 56", b"")}
    for n, (status, body) in answers.items():
        (tmp_path / f"{n}.status").write_text(status + "\n")
        (tmp_path / f"{n}.body").write_bytes(body)
    result = run(sys.executable, "deploy/validate.py", "drain-outcome", tmp_path, "3", "0", "5.5", "4")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == ("1 x 200, 1 x 503 shutting_down, 1 x no answer: curl exit 56 "
                                             "(connection reset); exit 0 after 5.5 s (limit 10 s)")
    assert "FAIL 1 x no answer: curl exit 56 (connection reset)" in result.stdout
    (tmp_path / "3.status").write_text("503 0\n")
    (tmp_path / "3.body").write_bytes(SHUTTING_DOWN)
    assert run(sys.executable, "deploy/validate.py", "drain-outcome", tmp_path, "3", "0", "5.5", "4").returncode == 0


def test_render_probe_draws_with_the_servers_renderer():
    # The script check.sh runs inside the image, here on the dev install (which has the render extra).
    assert render_probe.drawn_share() > 0.05
    assert render_probe.main() == 0
