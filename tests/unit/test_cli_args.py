"""The `paligemma` command line without a server: its arguments, its usage errors, and how a folder run
bounds the requests in flight (against a fake transport). Against a served process: tests/e2e/test_cli.py."""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import httpx
import pytest
from paligemma_client.cli import build_parser, main, run_folder, task_arguments

from tests.images import jpeg

IMAGE = jpeg(64, 48)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(IMAGE)
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_objects_are_the_words_after_the_image_or_options():
    unset = {"max_new_tokens": None, "temperature": None, "top_p": None, "top_k": None, "seed": None,
             "adapter": None}
    args = build_parser().parse_args(["detect", "photo.jpg", "cat", "dog", "--objects", "a ; b"])
    assert task_arguments(args) == ((["cat", "dog", "a ; b"],), unset)
    args = build_parser().parse_args(["segment", "images/", "--objects", "the dog", "--max-new-tokens", "9",
                                      "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3",
                                      "--adapter", "receipts"])
    assert task_arguments(args) == ((["the dog"],), {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9,
                                                     "top_k": 40, "seed": 3, "adapter": "receipts"})


def test_usage_errors_exit_2(photo):
    for argv in (["detect", str(photo)], ["caption", str(photo.with_name("missing.png"))],
                 ["caption", str(photo.parent), "--stream"]):
        with pytest.raises(SystemExit) as raised:
            cli(*argv)
        assert raised.value.code == 2


def test_a_folder_run_keeps_at_most_concurrency_requests_in_flight(tmp_path):
    files = []
    for i in range(10):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(IMAGE)
    in_flight = peak = 0
    body = {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "image": {"width": 1, "height": 1},
            "finish_reason": "stop", "raw_text": "", "text": "x", "warning": None,
            "timings": {"prepare_ms": 0, "queue_and_inference_ms": 0, "postprocess_ms": 0, "total_ms": 0}}

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=body)

    args = argparse.Namespace(task="caption", language="en", long=False, max_new_tokens=None, temperature=None,
                              top_p=None, top_k=None, seed=None, adapter=None, url="http://x", api_key=None, timeout=5.0,
                              concurrency=3, progress="never", draw=None)
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(run_folder(args, files, out, err, transport=httpx.MockTransport(handle)))
    assert code == 0 and len(out.getvalue().splitlines()) == 10
    assert peak == 3
