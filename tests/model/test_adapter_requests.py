"""The `adapter` field and the OpenAI `model` field on a server that serves no adapters, through the app's
real ASGI client: a refusal that says how to turn adapters on, nothing left held, and the OpenAI endpoint
taking any model name as before."""

from __future__ import annotations

import base64

from app.settings import Settings
from tests.helpers import serve
from tests.images import jpeg

IMAGE = jpeg(64, 48)


def test_an_adapter_on_a_server_without_adapters_is_a_404_that_says_how_to_serve_them():
    with serve(Settings(default_max_new_tokens=2)) as client:
        response = client.post("/v1/caption", files={"image": ("a.jpg", IMAGE)}, data={"adapter": "receipts"})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["param"] == "adapter"
        assert error["message"] == ("adapter 'receipts' is not loaded: this server serves no adapters (set "
                                    "PALIGEMMA_ADAPTERS or PALIGEMMA_ADAPTER_ROOT)")
        service = client.app.state.service
        assert not service.busy  # the refused request holds nothing (a drain would not wait for it)
        assert service.adapters is None  # nothing wrapped: the model runs as without adapters
        card = client.get("/v1/models").json()["data"]
        assert len(card) == 1 and card[0]["adapters"] is None
        assert client.post("/v1/adapters", json={"name": "x", "path": "x"}).status_code == 403


def test_without_adapters_the_openai_model_field_takes_any_name():
    url = "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode()
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": "caption en"}]}]
    with serve(Settings(default_max_new_tokens=2)) as client:
        for model in ("paligemma", "tiny", None):
            response = client.post("/v1/chat/completions", json={"model": model, "messages": message})
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "tiny"
