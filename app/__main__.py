"""`python -m app` / `paligemma-server`: serve on PALIGEMMA_HOST:PALIGEMMA_PORT.

SIGTERM (or Ctrl-C) starts a drain: /readyz turns 503 and new requests get 503 at once, every admitted
request still gets its answer until PALIGEMMA_DRAIN_TIMEOUT_S; at that deadline whatever is unfinished is
answered 503 (the JSON envelope), and the process exits 0 within a few seconds more. A second signal
exits at once. If the model cannot be loaded or the worker dies, the process exits 1 so the
orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import uvicorn

from app.lifecycle import Lifecycle, Phase

if TYPE_CHECKING:
    from app.serving.service import RunnerFactory
from app.settings import SettingsError, load_settings, removed_variables

# Seconds between the drain deadline and the process's exit at most: answers already decided are sent.
EXIT_GRACE_S = 3

# Import-time noise of optional libraries, not about this server: transformers imports torchao whenever it
# is installed (the `quantization` extra), and torchao then tries its kernels built for particular CUDA
# architectures, logging a warning for each one this host cannot load, and registers enums that torch's
# pytree calls deprecated; both happen at every start, whatever PALIGEMMA_QUANTIZATION says. A quantized
# layer that cannot run fails loudly when it is built (app.model.quantization).
IMPORT_NOISE = {"torchao": "Failed to load ",
                "torch.utils._pytree": "is an Enum subclass and is now natively supported"}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_import_noise() -> None:
    for name, text in IMPORT_NOISE.items():
        logging.getLogger(name).addFilter(_Drop(text))


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first exit signal drains the service before the sockets close."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float, app):
        super().__init__(config)
        self.signalled = False
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled or self.lifecycle.phase is Phase.DRAINING:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self.signalled = True
        logging.getLogger("app").info("signal %d: draining (up to %.0f s)", sig, self.drain_timeout_s)
        # A signal handler interrupts the event loop between any two bytecodes: the drain (which wakes
        # what waits on it) starts on the loop itself, at once.
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self.begin_drain)
        except RuntimeError:  # no loop runs (yet): nothing waits
            self.begin_drain()

    def begin_drain(self) -> None:
        self.lifecycle.begin_drain(self.drain_timeout_s)
        self.app.state.metrics.ready.set(0)
        service = self.app.state.service
        if service is not None:
            service.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        lifecycle = self.lifecycle
        if lifecycle.phase is Phase.FAILED:
            self.should_exit = True
        elif lifecycle.phase is Phase.DRAINING and not self.should_exit:
            service = self.app.state.service
            if service is None or not service.busy:
                self.should_exit = True
            elif time.monotonic() >= (lifecycle.drain_deadline or 0):
                # Answer everything still open now, so no client is cut off mid-response when the
                # sockets close (and no orchestrator's SIGKILL lands on a request).
                service.abort_unfinished()
                self.should_exit = True
        return await super().on_tick(counter)


def main(runner_factory: RunnerFactory | None = None) -> None:
    """Serve until a signal; `runner_factory` replaces the engine's model side (fault-injection tests).
    `paligemma-server plan ...` prints a memory plan instead (app.plan)."""
    if sys.argv[1:2] == ["plan"]:
        quiet_import_noise()
        from app.plan import main as plan

        sys.exit(plan(sys.argv[2:]))
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"paligemma-server: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_import_noise()
    for line in removed_variables(os.environ):
        logging.getLogger("app").warning(line)
    from app.main import create_app

    app = create_app(settings, runner_factory=runner_factory)
    # By the time uvicorn closes, every request has its answer (see on_tick); the grace period only
    # covers sending those answers.
    # access_log off: the app writes its own line per request, with the duration and the request id
    # (app.api.middleware).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=EXIT_GRACE_S, access_log=False)
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s, app)
    server.run()
    code = 0
    if app.state.lifecycle.phase is Phase.FAILED:
        logging.getLogger("app").error("exiting: %s", app.state.lifecycle.failure)
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    """Leave now: every answer is sent and the lifespan has released what it held. The interpreter's own
    teardown (unloading torch and transformers module by module) takes seconds more, measured at 1.5 to
    4 s on 2 busy cores, that an orchestrator counts against the grace period."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
