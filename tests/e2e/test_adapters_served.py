"""LoRA adapters through a served process (`python -m app`): chosen per request, loaded and unloaded at
run time, listed, counted, and refused with a 4xx that says why.

The adapters are trained here with PEFT on the `tiny` preset (tests/trained_adapters.py) and saved with
`save_pretrained`; what a request for one answers is compared with PEFT's own model with that adapter
merged in (`merge_and_unload`) running `generate` on the same image and prompt.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from app.engine.runner import RowInput
from app.images import decode_image
from app.model.inputs import ImageTransform, PromptEncoder
from app.settings import Settings
from tests.e2e.test_playground_browser import (  # the browser and its helpers (the fixture is module-scoped)
    browser,  # noqa: F401
    open_playground,
    page_result,
    script_errors,
    text,
    wait_for,
)
from tests.images import jpeg
from tests.model.test_engine_exactness import generate_alone
from tests.served import served
from tests.trained_adapters import KIND, merged_model, train_adapter

KEY = "adapter-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = jpeg(96, 72, seed=5)
# The request that an unload must wait for: long enough that the test's own requests, slowed by a busy
# machine, still land while it runs (200 tokens were not, under heavy load).
LONG_REQUEST_TOKENS = 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """PALIGEMMA_ADAPTER_ROOT: two trained adapters, a DoRA one, and a link that leads out of it."""
    from peft import LoraConfig, get_peft_model

    from app.model.loader import load_model

    root = tmp_path_factory.mktemp("adapters")
    train_adapter("tiny", KIND["attention"], root / "attention")
    train_adapter("tiny", KIND["everything"], root / "everything")
    dora = get_peft_model(load_model(Settings(model="tiny")).model,
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(root / "dora", save_embedding_layers=False)
    outside = tmp_path_factory.mktemp("outside")
    train_adapter("tiny", KIND["attention"], outside / "stray", steps=1)
    os.symlink(outside / "stray", root / "link-out")
    return root


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    env = {"PALIGEMMA_MODEL": "tiny", "PALIGEMMA_ADAPTERS": f"att={root / 'attention'}",
           "PALIGEMMA_ADAPTER_ROOT": str(root), "PALIGEMMA_API_KEYS": KEY, "PALIGEMMA_MAX_ADAPTERS": "2",
           "PALIGEMMA_MAX_NEW_TOKENS": str(LONG_REQUEST_TOKENS)}
    with served(tmp_path_factory.mktemp("adapter-server"), env=env) as server:
        yield server


def expected_text(folder: Path | None, prompt: str, max_new_tokens: int) -> str:
    """What PEFT's merged model (or the base, for None) generates for IMAGE and `prompt`, decoded as the
    server decodes its raw_text."""
    from app.model.loader import load_model

    loaded = merged_model("tiny", folder) if folder else load_model(Settings(model="tiny"))
    transform = ImageTransform.from_processor(loaded.processor)
    encoder = PromptEncoder.from_processor(loaded.processor)
    decoded = decode_image(IMAGE, max_pixels=10**8, min_side=transform.min_side)
    item = RowInput(encoder.encode(prompt), transform(decoded.image))
    return encoder.decode(generate_alone(loaded, item, max_new_tokens))


def caption(server, adapter: str | None = None, as_json: bool = False, **fields) -> httpx.Response:
    fields = {"max_new_tokens": 8, **fields, **({"adapter": adapter} if adapter else {})}
    if as_json:
        return httpx.post(f"{server.url}/v1/caption", headers=AUTH, timeout=60,
                          json={"image": base64.b64encode(IMAGE).decode(), **fields})
    return httpx.post(f"{server.url}/v1/caption", headers=AUTH, timeout=60, files={"image": ("a.jpg", IMAGE)},
                      data={k: str(v) for k, v in fields.items()})


def models(server) -> list[dict]:
    response = httpx.get(f"{server.url}/v1/models", headers=AUTH)
    assert response.status_code == 200
    return response.json()["data"]


def test_models_lists_the_base_then_each_adapter_naming_the_base_as_parent(server):
    base, *adapters = models(server)
    assert base["id"] == "tiny"
    assert base["adapters"]["max_adapters"] == 2 and base["adapters"]["max_lora_rank"] == 16
    assert base["adapters"]["runtime_loading"] is True and base["adapters"]["memory_bytes"] > 0
    assert [(a["id"], a["object"], a["parent"], a["rank"], a["vision"]) for a in adapters] == [
        ("att", "model", "tiny", 4, False)]


def test_the_adapter_field_answers_as_peft_s_merged_model(server, root):
    by_adapter = caption(server, "att")
    assert by_adapter.status_code == 200, by_adapter.text
    assert by_adapter.json()["adapter"] == "att"
    assert caption(server, "att", as_json=True).json()["raw_text"] == by_adapter.json()["raw_text"]
    base = caption(server).json()
    assert base["adapter"] is None
    assert by_adapter.json()["raw_text"] == expected_text(root / "attention", "caption en", 8)
    assert base["raw_text"] == expected_text(None, "caption en", 8)
    assert by_adapter.json()["raw_text"] != base["raw_text"]


def test_an_unknown_adapter_is_a_404_that_lists_the_loaded_ones(server):
    response = caption(server, "atten")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == "adapter"
    assert error["message"] == "adapter 'atten' is not loaded; loaded adapters: att (GET /v1/models lists them)"


def test_the_openai_model_field_names_the_base_or_an_adapter(server):
    url = "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode()
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": "caption en"}]}]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        adapted = client.chat.completions.create(model="att", messages=message, max_tokens=8)
        base = client.chat.completions.create(model="tiny", messages=message, max_tokens=8)
        assert (adapted.model, base.model) == ("att", "tiny")
        assert adapted.choices[0].message.content == caption(server, "att").json()["raw_text"]
        assert base.choices[0].message.content == caption(server).json()["raw_text"]
        assert [m.id for m in client.models.list()] == ["tiny", "att"]
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="paligemma", messages=message, max_tokens=8)
    assert "model 'paligemma' is neither the base ('tiny') nor a loaded adapter; loaded adapters: att" in str(
        caught.value)


def post_adapter(server, name: str, path: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": path},
                      headers=AUTH if headers is None else headers, timeout=120)


def test_loading_refuses_without_a_key_outside_the_root_and_what_it_cannot_compute(server, root):
    assert post_adapter(server, "x", "attention", headers={}).status_code == 401
    for path in ("/etc", "../outside", "link-out", str(root / ".." / "x")):
        response = post_adapter(server, "x", path)
        assert response.status_code == 400, path
        assert "is outside PALIGEMMA_ADAPTER_ROOT" in response.json()["error"]["message"]
    dora = post_adapter(server, "x", "dora")
    assert dora.status_code == 400
    assert dora.json()["error"]["message"].startswith(f"adapter folder {root / 'dora'}: it uses DoRA (use_dora)")
    missing = post_adapter(server, "x", "nothing-here")
    assert missing.status_code == 400 and "no such directory" in missing.json()["error"]["message"]
    assert post_adapter(server, "att", "attention").status_code == 409  # the name is taken
    assert post_adapter(server, "bad name!", "attention").status_code == 400
    assert [m["id"] for m in models(server)] == ["tiny", "att"]  # nothing was loaded


def adapter_series(server, name: str) -> list[str]:
    text = httpx.get(f"{server.url}/metrics").text
    return [line for line in text.splitlines() if f'adapter="{name}"' in line]


def test_load_serve_and_unload_at_run_time(server, root):
    loaded = post_adapter(server, "ev", str(root / "everything"))
    assert loaded.status_code == 201, loaded.text
    assert {k: loaded.json()[k] for k in ("id", "parent", "rank", "vision")} == {
        "id": "ev", "parent": "tiny", "rank": 16, "vision": True}
    assert [m["id"] for m in models(server)] == ["tiny", "att", "ev"]
    answer = caption(server, "ev")
    assert answer.status_code == 200 and answer.json()["raw_text"] == expected_text(root / "everything",
                                                                                    "caption en", 8)
    full = post_adapter(server, "third", "attention")
    assert full.status_code == 409 and "all 2 adapter slots are taken" in full.json()["error"]["message"]
    assert adapter_series(server, "ev")  # its requests are counted under its name

    deleted = httpx.delete(f"{server.url}/v1/adapters/ev", headers=AUTH, timeout=60)
    assert deleted.status_code == 200 and deleted.json() == {"id": "ev", "object": "model", "deleted": True}
    assert caption(server, "ev").status_code == 404
    assert [m["id"] for m in models(server)] == ["tiny", "att"]
    assert adapter_series(server, "ev") == []  # the label holds loaded names only
    assert httpx.delete(f"{server.url}/v1/adapters/ev", headers=AUTH).status_code == 404


def test_unloading_waits_for_the_adapter_s_running_requests(server, root):
    assert post_adapter(server, "slow", "attention").status_code == 201
    first_delta = threading.Event()
    outcome: dict = {}

    def long_request() -> None:
        with httpx.stream("POST", f"{server.url}/v1/caption", headers=AUTH, timeout=120,
                          files={"image": ("a.jpg", IMAGE)},
                          data={"adapter": "slow", "max_new_tokens": str(LONG_REQUEST_TOKENS),
                                "stream": "true"}) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("event: delta"):
                    outcome.setdefault("first_delta_at", time.monotonic())
                    outcome["last_delta_at"] = time.monotonic()
                    first_delta.set()
                events.append(line)
        outcome["status"] = response.status_code
        outcome["result"] = json.loads(events[events.index("event: result") + 1].removeprefix("data: "))

    runner = threading.Thread(target=long_request)
    runner.start()
    assert first_delta.wait(60)
    deleting = threading.Thread(target=lambda: outcome.update(
        deleted=httpx.delete(f"{server.url}/v1/adapters/slow", headers=AUTH, timeout=120),
        deleted_at=time.monotonic()))
    deleting.start()
    # While it waits, the adapter takes no new request.
    deadline = time.monotonic() + 30
    while (refused := caption(server, "slow")).status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused.json()["error"]["message"].startswith("adapter 'slow' is being unloaded; loaded adapters: att")
    runner.join(120)
    deleting.join(120)
    assert outcome["status"] == 200 and outcome["result"]["adapter"] == "slow"
    # It ran to its end with its adapter: what the same weights, loaded as "att", answer undisturbed.
    undisturbed = caption(server, "att", max_new_tokens=LONG_REQUEST_TOKENS).json()
    assert outcome["result"]["raw_text"] == undisturbed["raw_text"]
    assert outcome["result"]["usage"] == undisturbed["usage"]
    assert outcome["deleted"].status_code == 200
    # The unload answered when the stream was ending, not when it was asked (just after the first delta).
    # Measured against the stream's own span, since its last events and the DELETE's answer cross the
    # loopback in either order.
    span = outcome["last_delta_at"] - outcome["first_delta_at"]
    assert outcome["deleted_at"] >= outcome["first_delta_at"] + 0.8 * span


@pytest.fixture(scope="module")
def plain_server(root, tmp_path_factory):
    """Adapters at start-up only (no root, no keys); the adapter says it was trained on another base."""
    folder = tmp_path_factory.mktemp("elsewhere") / "old"
    train_adapter("tiny", KIND["attention"], folder, steps=1, base_model_name="google/paligemma-3b-pt-224")
    env = {"PALIGEMMA_MODEL": "tiny", "PALIGEMMA_ADAPTERS": f"old={folder}"}
    with served(tmp_path_factory.mktemp("plain-server"), env=env) as server:
        yield server


def test_without_a_root_run_time_loading_is_off(plain_server):
    response = httpx.post(f"{plain_server.url}/v1/adapters", json={"name": "x", "path": "/tmp"})
    assert response.status_code == 403
    assert "set PALIGEMMA_ADAPTER_ROOT" in response.json()["error"]["message"]
    assert httpx.delete(f"{plain_server.url}/v1/adapters/old").status_code == 403
    assert httpx.post(f"{plain_server.url}/v1/caption", files={"image": ("a.jpg", IMAGE)},
                      data={"adapter": "old", "max_new_tokens": "4"}).status_code == 200


def test_an_adapter_of_another_base_is_a_warning_not_an_error(plain_server):
    assert ("adapter 'old' was trained on 'google/paligemma-3b-pt-224', not on the served model 'tiny'"
            in plain_server.log())


def test_a_folder_it_cannot_serve_stops_start_up_naming_it(root, tmp_path):
    env = {"PALIGEMMA_MODEL": "tiny", "PALIGEMMA_ADAPTERS": f"good={root / 'attention'},bad={root / 'dora'}"}
    with served(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=120) == 1
    log = server.log()
    assert "Traceback" not in log, log
    assert (f"exiting: start-up failed: PALIGEMMA_ADAPTERS: adapter 'bad': adapter folder {root / 'dora'}: it "
            "uses DoRA (use_dora)") in log


def test_the_playground_offers_the_adapters_and_runs_the_chosen_one(server, browser, tmp_path):  # noqa: F811
    picture = tmp_path / "picture.jpg"
    picture.write_bytes(IMAGE)
    open_playground(browser, server.url, KEY)
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "adapter-field").is_displayed())
    select = Select(browser.find_element(By.ID, "adapter"))
    assert [o.get_attribute("value") for o in select.options] == ["", "att"]
    browser.find_element(By.ID, "file").send_keys(str(picture))
    wait_for(browser, "ready")
    Select(browser.find_element(By.ID, "task")).select_by_value("caption")
    select.select_by_value("att")
    browser.find_element(By.ID, "max-new-tokens").send_keys("8")
    assert "--form-string 'adapter=att'" in text(browser, "curl")
    browser.find_element(By.ID, "run").click()
    assert wait_for(browser, "done", "error") == "done", text(browser, "error")
    result = page_result(browser)
    assert result["adapter"] == "att"
    assert result["raw_text"] == caption(server, "att").json()["raw_text"]
    assert script_errors(browser) == []


def test_eval_scores_the_adapter_it_names(server, root, tmp_path, capsys):
    """`paligemma eval --adapter`: every request names the adapter, the document says which; an adapter
    the server has not loaded stops it before any request, listing the loaded ones."""
    from tests.e2e.test_eval_served import eval_cli

    (tmp_path / "a.jpg").write_bytes(IMAGE)
    expected = expected_text(root / "attention", "caption en", 8)  # PEFT's merged model, alone
    dataset = tmp_path / "caption.jsonl"
    dataset.write_text(json.dumps({"image": "a.jpg", "answers": [expected]}) + "\n")
    connection = ["--url", server.url, "--api-key", KEY, "--max-new-tokens", "8", "--json", "--progress", "never"]
    code, out, err = eval_cli("caption", "--jsonl", str(dataset), "--adapter", "att", *connection)
    assert code == 0, err
    document = json.loads(out)
    assert (document["model"], document["adapter"], document["exact_match"]) == ("tiny", "att", 1.0)
    code, out, err = eval_cli("caption", "--jsonl", str(dataset), *connection)  # the base says otherwise
    assert code == 0, err
    assert (json.loads(out)["adapter"], json.loads(out)["exact_match"]) == (None, 0.0)
    with pytest.raises(SystemExit) as exit_info:
        eval_cli("caption", "--jsonl", str(dataset), "--adapter", "atten", *connection)
    assert exit_info.value.code == 2
    assert "--adapter atten: the server has not loaded it; loaded adapters: att" in capsys.readouterr().err
