"""The served app runs all of the model's work on one thread: loading, building the runner, warm-up and
every step (app.engine.model_thread says why: CPU torch loses a third of its speed otherwise)."""

from __future__ import annotations

import threading

from app.engine.runner import ModelStepRunner
from app.main import create_app
from app.settings import Settings
from tests.helpers import files, serve
from tests.images import jpeg


def test_loading_warm_up_and_every_step_run_on_the_model_thread(monkeypatch):
    import app.main as main_module

    threads: dict[str, set[int]] = {"load": set(), "runner": set(), "prefill": set(), "decode": set()}
    load_model = main_module.load_model

    def recording_load(*args):
        threads["load"].add(threading.get_ident())
        return load_model(*args)

    class RecordingRunner(ModelStepRunner):
        def __init__(self, *args, **kwargs):
            threads["runner"].add(threading.get_ident())
            super().__init__(*args, **kwargs)

        def prefill(self, seqs):
            threads["prefill"].add(threading.get_ident())
            return super().prefill(seqs)

        def decode(self, seqs, width):
            threads["decode"].add(threading.get_ident())
            return super().decode(seqs, width)

    monkeypatch.setattr(main_module, "load_model", recording_load)
    app = create_app(Settings(api_keys=()), runner_factory=RecordingRunner)
    with serve(app=app) as client:
        response = client.post("/v1/caption", files=files(jpeg(64, 48)), data={"max_new_tokens": "4"})
        assert response.status_code == 200, response.text
        model_thread = app.state.model_thread._thread.ident
    assert all(threads[part] == {model_thread} for part in threads), threads
    assert model_thread != threading.get_ident()
