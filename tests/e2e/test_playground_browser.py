"""The playground and /docs in a real browser: Debian's headless Chromium, driven through chromedriver,
against a served process with the trained checkpoint and a mask decoder.

What the page drew is read back from its canvases: the box layer must be opaque on every box's outline
and clear inside, the mask layer opaque on exactly the pixels of the server's RLE mask. The browser
resolves no host but the loopback server, so a page that needed a CDN would fail here. A screenshot of
a segment run is kept in tests/output/.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from app.api.errors import service_error_body
from app.api.streaming import sse
from app.errors import InferenceFailed
from tests.trained_model import DETECT_BINS, SEGMENT_BINS, image_bytes, training_image

OUTPUT = Path(__file__).resolve().parents[1] / "output"  # tests/output, git-ignored
WIDTH, HEIGHT = 640, 400
IMAGE = image_bytes(training_image().resize((WIDTH, HEIGHT)))
# ENVIRONMENT.md's flags for headless Chromium here, plus: resolve nothing but the loopback address.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
INSTALL_HINT = "run `sudo scripts/install-system-deps.sh` (Debian packages chromium and chromium-driver)"

ALPHA_AT = """
const [id, points] = arguments;
const layer = document.getElementById(id);
const data = layer.getContext("2d").getImageData(0, 0, layer.width, layer.height).data;
return points.map(([x, y]) => data[(y * layer.width + x) * 4 + 3]);
"""
LAYER = """
const layer = document.getElementById(arguments[0]);
const data = layer.getContext("2d").getImageData(0, 0, layer.width, layer.height).data;
let bytes = "";
for (let i = 0; i < data.length; i += 1) bytes += String.fromCharCode(data[i]);
return [layer.width, layer.height, btoa(bytes)];
"""

# Records, in order, what is added to the text box and to the JSON box (filled once the result arrived).
OBSERVE = """
window.observed = [];
const observer = new MutationObserver((records) => {
  for (const r of records) {
    const added = [...r.addedNodes].map((node) => node.textContent).join("");
    window.observed.push([r.target.id, added, r.removedNodes.length]);
  }
});
for (const id of ["text", "json"]) observer.observe(document.getElementById(id), { childList: true });
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> WebDriver:
    chromium, chromedriver = _tool("chromium"), _tool("chromedriver")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver, log_output=str(profile / "driver.log")))
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    paths = {"box": tmp_path / "box.png", "broken": tmp_path / "broken.png"}
    paths["box"].write_bytes(IMAGE)
    paths["broken"].write_bytes(b"this is not an image at all")
    return paths


def open_playground(browser: WebDriver, url: str, key: str | None) -> None:
    browser.get(f"{url}/playground")
    browser.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('paligemma.apiKey', "
                           "arguments[0]);", key)
    browser.refresh()
    wait_for(browser, "empty")
    browser.get_log("browser")  # start each page's log afresh


def state(browser: WebDriver) -> str:
    return browser.execute_script("return document.body.dataset.state")


def wait_for(browser: WebDriver, *states: str) -> str:
    WebDriverWait(browser, 30).until(lambda b: state(b) in states)
    return state(browser)


def run_task(browser: WebDriver, task: str, image: Path, **fields: str) -> str:
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(browser, "ready")
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "run").click()
    return wait_for(browser, "done", "error")


def text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).get_attribute("textContent") or ""


def page_result(browser: WebDriver) -> dict:
    return json.loads(text(browser, "json"))


def layer(browser: WebDriver, element_id: str) -> np.ndarray:
    width, height, data = browser.execute_script(LAYER, element_id)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)


def script_errors(browser: WebDriver) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry.get("source") == "javascript"]


def pixels(bins: tuple[int, int, int, int]) -> list[float]:
    y1, x1, y2, x2 = bins
    return [x1 / 1023 * WIDTH, y1 / 1023 * HEIGHT, x2 / 1023 * WIDTH, y2 / 1023 * HEIGHT]


def corners(box: dict) -> tuple[int, int, int, int]:
    return tuple(round(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))  # type: ignore[return-value]


def test_docs_render_with_no_network(browser, trained_server):
    browser.get(f"{trained_server.url}/docs")
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return document.querySelectorAll('.opblock').length") >= 10)
    assert "PaliGemma server" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert "/v1/detect" in browser.find_element(By.ID, "swagger-ui").text
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(name.endswith("/swagger-ui-bundle.js") for name in loaded)
    assert all(name.startswith(trained_server.url) for name in loaded), loaded
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_the_start_page_links_the_playground_which_starts_empty(browser, trained_server):
    browser.get(f"{trained_server.url}/")
    browser.find_element(By.LINK_TEXT, "Playground").click()
    open_playground(browser, trained_server.url, key=None)
    assert browser.current_url == f"{trained_server.url}/playground"
    assert not browser.find_element(By.ID, "run").is_enabled()
    assert not browser.find_element(By.ID, "stage").is_displayed()
    assert "Choose or drop an image" in text(browser, "status")
    browser.find_element(By.ID, "objects").send_keys("car ; person")
    curl = text(browser, "curl")
    assert "--form-string 'objects=car ; person'" in curl and "-F 'image=@photo.jpg'" in curl
    assert f"'{trained_server.url}/v1/detect'" in curl and "Authorization" not in curl


def test_the_api_key_is_asked_for_sent_and_kept_for_the_tab(browser, trained_server, images):
    open_playground(browser, trained_server.url, key=None)
    assert run_task(browser, "caption", images["box"]) == "error"
    assert "401 unauthorized" in text(browser, "error") and "API key" in text(browser, "error")

    browser.find_element(By.ID, "api-key").send_keys(trained_server.key)
    browser.find_element(By.ID, "run").click()
    assert wait_for(browser, "done", "error") == "done"
    assert text(browser, "text") == "a red box on white"
    assert browser.execute_script("return sessionStorage.getItem('paligemma.apiKey')") == trained_server.key
    curl = text(browser, "curl")
    assert '-H "Authorization: Bearer $PALIGEMMA_API_KEY"' in curl and trained_server.key not in curl

    browser.refresh()
    wait_for(browser, "empty")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == trained_server.key


def test_detect_draws_every_box_where_the_server_put_it(browser, trained_server, images):
    open_playground(browser, trained_server.url, trained_server.key)
    assert run_task(browser, "detect", images["box"], objects="red box") == "done", text(browser, "error")
    detections = page_result(browser)["detections"]
    assert [d["label"] for d in detections] == ["red box", "box"]
    assert [detections[0]["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")] == \
        pytest.approx(pixels(DETECT_BINS), abs=0.01)

    boxes = layer(browser, "box-layer")
    assert boxes.shape == (HEIGHT, WIDTH, 4)
    for detection in detections:
        x1, y1, x2, y2 = corners(detection["box"])
        outline = np.concatenate([boxes[y1:y2, x1, 3], boxes[y1:y2, x2 - 1, 3], boxes[y1, x1:x2, 3],
                                  boxes[y2 - 1, x1:x2, 3]])
        assert (outline == 255).all(), detection["label"]
    x1, y1, x2, y2 = corners(detections[0]["box"])
    assert not boxes[y1 + 5:y2 - 5, 260:x2 - 5, 3].any()  # clear inside (the other box ends at x=250)
    assert not boxes[y2 + 3:, :, 3].any() and not boxes[:, x2 + 3:, 3].any()  # and clear beyond
    assert boxes[y1 - 3, x1 + 3, 3] == 255  # the label's tab sits on the box's top-left corner
    assert not layer(browser, "mask-layer")[..., 3].any()
    assert tuple(layer(browser, "image-layer")[200, 320, :3]) == (255, 0, 0)  # the image itself

    items = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#objects-list li")]
    assert items[0] == "red box: box [80, 100, 560, 300] px"
    usage = page_result(browser)["usage"]
    stats = text(browser, "stats")
    assert f"{usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated" in stats
    assert "ms round trip" in stats
    assert "red box" in text(browser, "text")  # the model's output as generated
    assert "--form-string 'objects=red box'" in text(browser, "curl")
    assert not script_errors(browser)


def test_segment_overlays_its_mask_on_exactly_the_masks_pixels(browser, trained_server, images):
    open_playground(browser, trained_server.url, trained_server.key)
    assert run_task(browser, "segment", images["box"], objects="red box") == "done", text(browser, "error")
    [segment] = page_result(browser)["segments"]
    assert [segment["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")] == \
        pytest.approx(pixels(SEGMENT_BINS), abs=0.01)
    rle = segment["mask"]
    expected = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    assert expected.sum() == segment["mask_area"] > 0

    masks = layer(browser, "mask-layer")
    assert np.array_equal(masks[..., 3] > 0, expected)
    # The first palette colour, 45 % opaque (the canvas stores premultiplied alpha: a unit of rounding).
    assert (np.abs(masks[expected].astype(int) - (0xA3, 0x51, 0xFB, 115)) <= 1).all()
    x1, y1, _, y2 = corners(segment["box"])
    assert (layer(browser, "box-layer")[y1:y2, x1, 3] == 255).all()
    assert f"mask of {segment['mask_area']} px" in text(browser, "objects-list")
    assert not script_errors(browser)
    OUTPUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "playground-segment.png"))


def test_a_text_task_shows_its_text_and_clears_earlier_drawings(browser, trained_server, images):
    open_playground(browser, trained_server.url, trained_server.key)
    assert run_task(browser, "detect", images["box"], objects="red box") == "done"
    assert layer(browser, "box-layer")[..., 3].any()
    Select(browser.find_element(By.ID, "task")).select_by_value("caption")
    browser.find_element(By.ID, "run").click()
    assert wait_for(browser, "done", "error") == "done"
    assert text(browser, "text") == "a red box on white"
    assert not layer(browser, "box-layer")[..., 3].any() and not layer(browser, "mask-layer")[..., 3].any()
    assert text(browser, "objects-list") == ""


def test_a_file_the_server_refuses_shows_the_servers_error(browser, trained_server, images):
    open_playground(browser, trained_server.url, trained_server.key)
    assert run_task(browser, "detect", images["broken"], objects="red box") == "error"
    assert "this browser cannot show it" in text(browser, "drop-hint")
    error = text(browser, "error")
    assert error.startswith("415 unsupported_media_type: unsupported image format")
    assert "request id: " in error
    assert not browser.find_element(By.ID, "output").is_displayed()
    assert not script_errors(browser)


def test_a_dropped_image_is_taken_like_a_chosen_one(browser, trained_server):
    open_playground(browser, trained_server.url, trained_server.key)
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
    """, base64.b64encode(IMAGE).decode())
    wait_for(browser, "ready")
    assert text(browser, "drop-hint") == "dropped.png (640 x 400)"
    assert "-F 'image=@dropped.png'" in text(browser, "curl")


def test_streamed_text_fills_the_box_before_the_result_which_draws_the_boxes(browser, trained_server, images):
    open_playground(browser, trained_server.url, trained_server.key)
    browser.find_element(By.ID, "file").send_keys(str(images["box"]))
    wait_for(browser, "ready")
    Select(browser.find_element(By.ID, "task")).select_by_value("detect")
    browser.find_element(By.ID, "objects").send_keys("red box")
    assert browser.find_element(By.ID, "stream").is_selected()  # streaming is the default
    curl = text(browser, "curl")
    assert curl.startswith("curl -s -N ") and "--form-string 'stream=true'" in curl
    browser.execute_script(OBSERVE)
    browser.find_element(By.ID, "run").click()
    assert wait_for(browser, "done", "error") == "done", text(browser, "error")

    result = page_result(browser)
    observed = browser.execute_script("return window.observed")
    shown = next(i for i, (target, added, _) in enumerate(observed) if target == "json" and added)
    deltas = [added for target, added, removed in observed[:shown] if target == "text" and added and not removed]
    assert len(deltas) > 1  # the box filled piece by piece before the result came
    assert "".join(deltas) == result["raw_text"]
    assert int(browser.find_element(By.ID, "text").get_attribute("data-deltas")) == len(deltas)
    assert text(browser, "text") == result["raw_text"]  # detect has no text field: the raw output stays
    assert "first text after" in text(browser, "stats")

    assert [d["label"] for d in result["detections"]] == ["red box", "box"]  # drawn from the result event
    x1, y1, _, y2 = corners(result["detections"][0]["box"])
    assert (layer(browser, "box-layer")[y1:y2, x1, 3] == 255).all()
    assert not script_errors(browser)


def test_sampling_controls_start_collapsed_and_a_seed_repeats_with_or_without_streaming(browser, trained_server,
                                                                                        images):
    open_playground(browser, trained_server.url, trained_server.key)
    sampling = browser.find_element(By.ID, "sampling")
    assert sampling.get_attribute("open") is None and not browser.find_element(By.ID, "temperature").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#sampling summary").click()
    for field, value in (("temperature", "2"), ("seed", "5")):
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "stream").click()  # off
    assert run_task(browser, "caption", images["box"], **{"max-new-tokens": "12"}) == "done", text(browser, "error")
    curl = text(browser, "curl")
    assert "--form-string 'temperature=2'" in curl and "--form-string 'seed=5'" in curl
    assert " -N " not in curl and "stream=true" not in curl
    unstreamed = page_result(browser)
    assert browser.find_element(By.ID, "text").get_attribute("data-deltas") is None

    direct = httpx.post(f"{trained_server.url}/v1/caption", files={"image": ("box.png", IMAGE, "image/png")},
                        data={"temperature": "2", "seed": "5", "max_new_tokens": "12"},
                        headers={"Authorization": f"Bearer {trained_server.key}"}).json()
    assert unstreamed["raw_text"] == direct["raw_text"] and unstreamed["text"] == text(browser, "text")

    browser.find_element(By.ID, "stream").click()  # on again: the same seed, the same sample, streamed
    browser.find_element(By.ID, "run").click()
    assert wait_for(browser, "done", "error") == "done", text(browser, "error")
    assert page_result(browser)["raw_text"] == direct["raw_text"] and text(browser, "text") == direct["text"]
    assert int(browser.find_element(By.ID, "text").get_attribute("data-deltas")) > 1
    assert not script_errors(browser)


def test_an_error_inside_the_stream_shows_the_servers_message_after_the_text_so_far(browser, trained_server, images):
    """A failure after a stream began is rare and hard to provoke on purpose (the client tests do, with a
    server stopped mid-generation); here the page's fetch answers with the events the server writes then."""
    events = sse("delta", {"text": "a red"}) + sse("delta", {"text": " box"}) + sse(
        "error", service_error_body(InferenceFailed("the model failed on this request"), "req-42"))
    open_playground(browser, trained_server.url, trained_server.key)
    browser.execute_script("""
        const body = arguments[0];
        window.fetch = async () => new Response(body, {
            status: 200, headers: { "content-type": "text/event-stream", "x-request-id": "req-42" } });
    """, events.decode())
    assert run_task(browser, "caption", images["box"]) == "error"
    assert text(browser, "error") == ("internal_error (after the stream began): the model failed on this request"
                                      "\nrequest id: req-42")
    assert text(browser, "text") == "a red box"  # what came before the error stays
    assert browser.find_element(By.ID, "output").is_displayed() and text(browser, "json") == ""
    assert not script_errors(browser)
