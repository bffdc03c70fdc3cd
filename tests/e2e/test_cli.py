"""The `paligemma` command line against a served process: one image, drawings, and folder runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from paligemma_client.cli import main
from PIL import Image
from pycocotools import mask as coco_mask

from tests.trained_model import image_bytes, training_image

WIDTH, HEIGHT = 640, 400
IMAGE = image_bytes(training_image().resize((WIDTH, HEIGHT)))


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(IMAGE)
    return path


@pytest.fixture
def env(trained_server, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_URL", trained_server.url)
    monkeypatch.setenv("PALIGEMMA_API_KEY", trained_server.key)
    return {**os.environ}


class Written(io.StringIO):
    """stdout that keeps each write, to see what was printed piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def cli(*argv: str, out: io.StringIO | None = None) -> tuple[int, str, str]:
    out, err = out or io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_the_installed_command_captions_a_photo(env, photo):
    command = Path(sys.executable).with_name("paligemma")
    done = subprocess.run([str(command), "caption", str(photo)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a red box on white\n"


def test_url_and_key_options_override_the_environment(trained_server, photo, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("PALIGEMMA_API_KEY", raising=False)
    code, out, err = cli("caption", str(photo), "--url", trained_server.url)
    assert code == 1 and "401 unauthorized" in err
    code, out, _ = cli("caption", str(photo), "--url", trained_server.url, "--api-key", trained_server.key)
    assert (code, out) == (0, "a red box on white\n")


def test_json_output_is_the_servers_result(env, photo):
    code, out, _ = cli("detect", str(photo), "red box", "--json")
    assert code == 0
    result = json.loads(out)
    direct = httpx.post(f"{env['PALIGEMMA_URL']}/v1/detect", files={"image": ("p.png", IMAGE, "image/png")},
                        data={"objects": "red box"}, headers={"Authorization": f"Bearer {env['PALIGEMMA_API_KEY']}"})
    expected = direct.json()
    for body in (result, expected):
        body.pop("timings")
    assert result == expected


def _changed(drawn: Path, original: bytes) -> np.ndarray:
    with Image.open(drawn) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    before = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=int)
    return np.abs(pixels - before).sum(axis=2) > 0


def _outline(box: dict, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    x1, y1, x2, y2 = (round(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    outline = np.zeros((height, width), bool)
    outline[y1:y2 + 1, [x1, x2]] = True
    outline[[y1, y2], x1:x2 + 1] = True
    return outline


def _near(boxes: list[dict], margin: int) -> np.ndarray:
    near = np.zeros((HEIGHT, WIDTH), bool)
    for box in boxes:
        x1, y1, x2, y2 = (round(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        near[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin] = True
    return near


def test_detect_draws_its_boxes_on_the_photo(env, photo, tmp_path):
    drawn = tmp_path / "out.png"
    code, out, err = cli("detect", str(photo), "red box", "--draw", str(drawn))
    assert code == 0 and "drew 2 objects" in err
    assert out.splitlines()[0].startswith("red box: [80.1, 100.1, 559.9, 299.9]")
    _, json_out, _ = cli("detect", str(photo), "red box", "--json")
    boxes = [d["box"] for d in json.loads(json_out)["detections"]]

    changed = _changed(drawn, IMAGE)
    for box in boxes:
        outline = _outline(box)
        assert changed[outline].mean() > 0.9  # the box is drawn where the server put it
    assert not changed[~_near(boxes, margin=40)].any()  # and nothing is drawn away from the boxes
    x1, y1, x2, y2 = (round(boxes[0][k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    assert not changed[y1 + 10:y2 - 10, max(x1 + 10, 260):x2 - 10].any()  # no fill inside a detect box


def test_segment_draws_its_mask(env, photo, tmp_path):
    drawn = tmp_path / "mask.png"
    code, out, _ = cli("segment", str(photo), "red box", "--draw", str(drawn))
    assert code == 0 and ", mask " in out
    _, json_out, _ = cli("segment", str(photo), "red box", "--json")
    [segment] = json.loads(json_out)["segments"]
    mask = coco_mask.decode({"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()})
    mask = mask.astype(bool)
    changed = _changed(drawn, IMAGE)
    assert changed[mask].mean() > 0.99  # tinted wherever the mask is
    assert not changed[~mask & ~_near([segment["box"]], margin=40)].any()


def test_a_folder_run_reports_the_corrupt_file_and_finishes_the_rest(env, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.PNG", "c.png"):
        (folder / name).write_bytes(IMAGE)
    (folder / "broken.png").write_bytes(IMAGE[:200])  # truncated
    (folder / "notes.txt").write_text("not an image, not sent")
    results, drawings = tmp_path / "results.jsonl", tmp_path / "drawn"

    code, out, err = cli("detect", str(folder), "--objects", "red box", "--out", str(results), "--draw",
                         str(drawings), "--concurrency", "2", "--progress", "always")
    assert code == 1 and out == ""
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    by_file = {Path(line["file"]).name: line for line in lines}
    assert sorted(by_file) == ["a.png", "b.PNG", "broken.png", "c.png"]
    broken = by_file.pop("broken.png")
    assert broken["ok"] is False
    assert broken["error"]["status"] == 400 and broken["error"]["type"] == "invalid_image"
    assert "truncated" in broken["error"]["message"] and broken["error"]["request_id"]
    assert all(line["ok"] and line["result"]["detections"][0]["label"] == "red box" for line in by_file.values())
    assert sorted(p.name for p in drawings.iterdir()) == ["a.png", "b.png", "c.png"]

    assert "[" + "#" * 30 + "] 4/4 failed 1" in err  # the progress bar's last state
    assert "4 images in" in err and "3 ok, 1 failed" in err
    assert f"{folder / 'broken.png'}: 400 invalid_image" in err


def test_stream_prints_the_text_as_it_is_generated(env, photo):
    out = Written()
    code, printed, _ = cli("caption", str(photo), "--stream", out=out)
    assert (code, printed) == (0, "a red box on white\n")
    assert len(out.writes) > 2  # piece by piece, then the line's end

    out = Written()
    code, printed, _ = cli("segment", str(photo), "red box", "--stream", out=out)
    streamed, *objects = printed.splitlines()
    _, json_out, _ = cli("segment", str(photo), "red box", "--json")
    _, unstreamed, _ = cli("segment", str(photo), "red box")
    assert code == 0 and len(out.writes) > 2
    assert streamed == json.loads(json_out)["raw_text"]  # the raw output, <loc>/<seg> tokens and all
    assert objects == unstreamed.splitlines() and objects[0].startswith("red box: [")  # then the objects


def test_stream_with_sampling_options_repeats_with_a_seed(env, photo):
    sampled = [cli("caption", str(photo), "--stream", "--temperature", "2", "--seed", str(seed),
                   "--max-new-tokens", "12")[1] for seed in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample
    assert len(set(sampled)) > 1  # other seeds, other samples: the options reach the server


def test_a_refused_stream_reports_the_servers_error(env, photo):
    code, out, err = cli("caption", str(photo), "--stream", "--max-new-tokens", "100000")
    assert code == 1 and out == ""
    assert "422 validation_error: `max_new_tokens` must be <= 256" in err and "request id" in err
