"""A real server under bursts, faults, disconnects and SIGTERM: every admitted request is answered."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from app.__main__ import EXIT_GRACE_S
from tests.helpers import metric_value
from tests.images import encode, jpeg
from tests.served import served

BLUE = encode(Image.new("RGB", (40, 30), (0, 0, 255)), "PNG")  # the launcher makes its prefill slow
GREEN = encode(Image.new("RGB", (40, 30), (0, 255, 0)), "PNG")  # ... and each of its decode steps
BLACK = encode(Image.new("RGB", (40, 30), (0, 0, 0)), "PNG")  # ... and its prefill fail
YELLOW = encode(Image.new("RGB", (40, 30), (255, 255, 0)), "PNG")  # ... and its prefill hang


async def _post(client: httpx.AsyncClient, url: str, image: bytes, **data: str) -> httpx.Response:
    return await client.post(f"{url}/v1/caption", files={"image": ("i.png", image, "image/png")},
                             data={"max_new_tokens": "4", **data})


async def _many(url: str, images: list[bytes], delay_first_s: float = 0.0) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=len(images) + 5, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        first = asyncio.create_task(_post(client, url, images[0]))
        await asyncio.sleep(delay_first_s)
        rest = [asyncio.create_task(_post(client, url, image)) for image in images[1:]]
        return await asyncio.gather(first, *rest, return_exceptions=True)


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def test_a_burst_of_eight_times_the_queue_is_answered_exactly_once_each(tmp_path):
    env = {"PALIGEMMA_MAX_QUEUE": "8", "PALIGEMMA_MAX_BATCH_SIZE": "4", "FAULT_SLOW_S": "1.5"}
    with served(tmp_path, env=env, faults=True) as server:
        images = [BLUE] + [jpeg(64, 48, seed=i) for i in range(64)]
        responses = asyncio.run(_many(server.url, images, delay_first_s=0.3))
        assert not [r for r in responses if isinstance(r, Exception)], responses
        statuses = [r.status_code for r in responses if isinstance(r, httpx.Response)]
        ok, full = statuses.count(200), statuses.count(429)
        assert ok + full == len(images), statuses
        assert full > 0 and ok >= 9  # the slow one, plus at least a full queue behind it
        assert all(r.headers.get("retry-after") for r in responses
                   if isinstance(r, httpx.Response) and r.status_code == 429)
        metrics = _metrics(server.url)
        assert metric_value(metrics, "paligemma_rejections_total", reason="queue_full") == full
        assert metric_value(metrics, "paligemma_requests_total", endpoint="/v1/caption", status="200") == ok
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_failing_request_does_not_fail_its_batch_neighbours(tmp_path):
    env = {"PALIGEMMA_MAX_BATCH_SIZE": "8", "FAULT_SLOW_S": "1.5"}
    with served(tmp_path, env=env, faults=True) as server:
        warmed = _metrics(server.url)
        # The slow request holds the worker while the other five queue up, so they share one prefill.
        images = [BLUE, jpeg(64, 48, seed=1), jpeg(80, 60, seed=2), BLACK, jpeg(50, 50, seed=3), jpeg(70, 40, seed=4)]
        responses = asyncio.run(_many(server.url, images, delay_first_s=0.3))
        statuses = [r.status_code for r in responses if isinstance(r, httpx.Response)]
        assert statuses == [200, 200, 200, 500, 200, 200], statuses
        error = responses[3].json()["error"]
        assert error["type"] == "internal_error" and error["request_id"]
        assert "Traceback" not in responses[3].text
        metrics = _metrics(server.url)
        # The five were prefilled together, failed, and were retried one at a time: the slow one and
        # the four neighbours each ran a prefill of one.
        assert "a prefill of 5 requests failed" in server.log()
        single = {"phase": "prefill", "le": "1.0"}
        assert (metric_value(metrics, "paligemma_step_rows_bucket", **single)
                - metric_value(warmed, "paligemma_step_rows_bucket", **single)) == 5
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.post(f"{server.url}/v1/ocr", files={"image": ("a.jpg", jpeg(), "image/jpeg")},
                          data={"max_new_tokens": "2"}).status_code == 200


def test_a_client_that_hangs_up_while_queued_is_not_computed(tmp_path):
    with served(tmp_path, env={"FAULT_SLOW_S": "2"}, faults=True) as server:
        warmed = _metrics(server.url)

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as client:
                blocker = asyncio.create_task(_post(client, server.url, BLUE))
                await asyncio.sleep(0.4)  # the worker is now busy for two seconds
                body, boundary = _multipart_caption(jpeg(64, 48, seed=9))
                parsed = urlparse(server.url)
                with socket.create_connection((parsed.hostname, parsed.port)) as sock:
                    sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                 b"boundary=" + boundary + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    await asyncio.sleep(0.3)  # admitted and queued behind the slow batch
                return await blocker

        assert asyncio.run(scenario()).status_code == 200
        time.sleep(0.5)
        metrics = _metrics(server.url)
        assert metric_value(metrics, "paligemma_rejections_total", reason="disconnected") == 1
        # After the warm-up only the slow one was prefilled: the abandoned request never reached the model.
        prefilled = {"phase": "prefill"}
        assert (metric_value(metrics, "paligemma_step_rows_sum", **prefilled)
                - metric_value(warmed, "paligemma_step_rows_sum", **prefilled)) == 1
        assert metric_value(metrics, "paligemma_requests_total", endpoint="/v1/caption", status="499") == 1


def _large_png() -> bytes:
    """A 7000 x 7000 PNG of stripes: under 1 MB, and a second or more to decode (49 megapixels)."""
    y, x = np.mgrid[0:7000, 0:7000]
    stripes = np.stack([(x // 7) % 256, (y // 7) % 256, ((x + y) // 13) % 256], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(stripes), "PNG", compress_level=9)


def test_a_client_that_leaves_while_its_image_is_prepared_is_counted(tmp_path):
    with served(tmp_path, env={"PALIGEMMA_PREPARE_WORKERS": "1"}) as server:
        warmed = _metrics(server.url)
        large = _large_png()

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                # Two large images hold the one preparing thread for seconds...
                blockers = [asyncio.create_task(_post(client, server.url, large)) for _ in range(2)]
                await asyncio.sleep(0.3)
                # ...while a third request waits for it, and its client hangs up.
                body, boundary = _multipart_caption(jpeg(64, 48, seed=5))
                parsed = urlparse(server.url)
                with socket.create_connection((parsed.hostname, parsed.port)) as sock:
                    sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                 b"boundary=" + boundary + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    await asyncio.sleep(0.3)
                return await asyncio.gather(*blockers)

        assert [r.status_code for r in asyncio.run(scenario())] == [200, 200]
        metrics = _metrics(server.url)
        assert metric_value(metrics, "paligemma_requests_total", endpoint="/v1/caption", status="499") == 1
        assert metric_value(metrics, "paligemma_rejections_total", reason="disconnected") == 1
        prefilled = {"phase": "prefill"}  # only the two large ones reached the model
        assert (metric_value(metrics, "paligemma_step_rows_sum", **prefilled)
                - metric_value(warmed, "paligemma_step_rows_sum", **prefilled)) == 2


def test_a_client_that_leaves_mid_generation_stops_its_rows_work(tmp_path):
    with served(tmp_path, env={"FAULT_STEP_S": "0.02"}, faults=True) as server:
        tokens = "paligemma_generated_tokens_total"
        before = metric_value(_metrics(server.url), tokens, endpoint="/v1/caption")
        # Control: left alone, this request generates every token it asked for (no early <eos>).
        whole = httpx.post(f"{server.url}/v1/caption", files={"image": ("g.png", GREEN, "image/png")},
                           data={"max_new_tokens": "60"}, timeout=60)
        assert whole.json()["usage"]["completion_tokens"] == 60
        after_whole = metric_value(_metrics(server.url), tokens, endpoint="/v1/caption")
        assert after_whole - before == 60

        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s of a 5 s generation
            httpx.post(f"{server.url}/v1/caption", files={"image": ("g.png", GREEN, "image/png")},
                       data={"max_new_tokens": "250"}, timeout=httpx.Timeout(30, read=1.0))
        time.sleep(1.0)
        metrics = _metrics(server.url)
        spent = metric_value(metrics, tokens, endpoint="/v1/caption") - after_whole
        assert 5 < spent < 150, spent  # it generated until the client left, then its row stopped
        assert metric_value(metrics, "paligemma_rejections_total", reason="disconnected") == 1
        assert metric_value(metrics, "paligemma_running_requests") == 0
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_client_that_leaves_mid_stream_stops_its_rows_work(tmp_path):
    leavers = 3
    with served(tmp_path, env={"FAULT_STEP_S": "0.02", "FAULT_GC_S": "0.2"}, faults=True) as server:
        tokens = "paligemma_generated_tokens_total"
        before = metric_value(_metrics(server.url), tokens, endpoint="/v1/caption")
        for _ in range(leavers):
            with httpx.stream("POST", f"{server.url}/v1/caption", timeout=30,
                              files={"image": ("g.png", GREEN, "image/png")},
                              data={"max_new_tokens": "250", "stream": "true"}) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                deltas = 0
                for line in lines:  # read a few deltas, then hang up mid-generation
                    deltas += line.startswith("event: delta")
                    if deltas == 5:
                        break
        time.sleep(1.0)
        metrics = _metrics(server.url)
        spent = metric_value(metrics, tokens, endpoint="/v1/caption") - before
        assert 5 * leavers <= spent < 100 * leavers, spent
        assert metric_value(metrics, "paligemma_rejections_total", reason="disconnected") == leavers
        assert metric_value(metrics, "paligemma_running_requests") == 0
        # Every task a stream starts is cancelled and awaited when its client leaves: none was left
        # pending (the garbage collector, run every 0.2 s, would have reported it by now).
        assert "Task was destroyed but it is pending" not in server.log()


def _multipart_caption(image: bytes) -> tuple[bytes, bytes]:
    boundary = b"hangup"
    body = (b"--hangup\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--hangup--\r\n")
    return body, boundary


def test_sigterm_under_load_answers_every_admitted_request_then_exits_zero(tmp_path):
    env = {"FAULT_SLOW_S": "1.5", "PALIGEMMA_MAX_BATCH_SIZE": "4"}
    with served(tmp_path, env=env, faults=True) as server:
        async def scenario():
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                admitted = [asyncio.create_task(_post(client, server.url, BLUE))]
                await asyncio.sleep(0.3)
                admitted += [asyncio.create_task(_post(client, server.url, jpeg(64, 48, seed=i))) for i in range(12)]
                await asyncio.sleep(0.5)  # all admitted and queued behind the slow batch
                server.process.send_signal(15)
                await asyncio.sleep(0.2)
                late = []
                for _ in range(3):
                    try:
                        late.append((await _post(client, server.url, jpeg())).status_code)
                    except httpx.HTTPError:
                        late.append("refused")
                ready = None
                try:
                    ready = (await client.get(f"{server.url}/readyz")).status_code
                except httpx.HTTPError:
                    ready = "refused"
                return await asyncio.gather(*admitted, return_exceptions=True), late, ready

        admitted, late, ready = asyncio.run(scenario())
        assert [getattr(r, "status_code", r) for r in admitted] == [200] * 13
        assert all(status in (503, "refused") for status in late), late
        assert ready in (503, "refused")
        assert server.process.wait(timeout=60) == 0


def test_liveness_fails_while_the_worker_is_stuck_and_recovers_after(tmp_path):
    env = {"FAULT_HANG_S": "4", "PALIGEMMA_LIVENESS_STALL_S": "1"}
    with served(tmp_path, env=env, faults=True) as server:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}

        async def scenario() -> tuple[list[int], httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                stuck = asyncio.create_task(_post(client, server.url, YELLOW))
                seen = []
                for _ in range(30):  # every 0.1 s while the worker hangs
                    await asyncio.sleep(0.1)
                    seen.append((await client.get(f"{server.url}/healthz")).status_code)
                return seen, await stuck

        seen, stuck = asyncio.run(scenario())
        assert seen[:5] == [200] * 5  # not before the stall limit
        assert 503 in seen[12:]  # past it, liveness fails: an orchestrator would restart the process
        assert stuck.status_code == 200  # the step did end, and the request got its answer
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_sigterm_under_overload_answers_everyone_by_the_drain_deadline_and_exits_in_time(tmp_path):
    drain_s = 4.0
    env = {"PALIGEMMA_DRAIN_TIMEOUT_S": str(drain_s), "PALIGEMMA_MAX_BATCH_SIZE": "2", "FAULT_STEP_S": "0.02"}
    with served(tmp_path, env=env, faults=True) as server:
        async def scenario():
            limits = httpx.Limits(max_connections=80, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                # 64 generations of 0.4 s each on 2 rows: about 13 s of work, three times the drain.
                admitted = [asyncio.create_task(_post(client, server.url, GREEN, max_new_tokens="20"))
                            for _ in range(64)]
                await asyncio.sleep(1.5)
                server.process.send_signal(15)
                signalled = time.monotonic()
                responses = await asyncio.gather(*admitted, return_exceptions=True)
                return responses, signalled

        responses, signalled = asyncio.run(scenario())
        code = server.process.wait(timeout=60)
        exited_after = time.monotonic() - signalled
        assert code == 0
        assert exited_after < drain_s + EXIT_GRACE_S, exited_after  # what the grace periods are sized for
        statuses = [getattr(r, "status_code", repr(r)) for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1 and statuses.count(503) >= 32
        for response in responses:
            if response.status_code == 503:
                assert response.json()["error"]["type"] == "shutting_down"


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_sigterm_while_a_client_uploads_answers_it_503_shutting_down(tmp_path):
    with served(tmp_path, env={"PALIGEMMA_DRAIN_TIMEOUT_S": "5"}) as server:
        body, boundary = _multipart_caption(jpeg(640, 480, seed=3))
        parsed = urlparse(server.url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                         b"boundary=" + boundary + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                         + body[:len(body) // 2])
            time.sleep(0.5)  # the server is reading the body, waiting for the rest
            server.process.send_signal(15)
            signalled = time.monotonic()
            answer = _read_until_closed(sock)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer[:500]
        error = json.loads(payload)["error"]
        assert error["type"] == "shutting_down" and error["request_id"]
        assert server.process.wait(timeout=60) == 0
        # Nothing else was in flight: the drain ends at once, and so does the process.
        assert time.monotonic() - signalled < EXIT_GRACE_S
    assert "Traceback" not in server.log()


def _caption_request(image: bytes, **fields: str) -> bytes:
    """A whole HTTP request for /v1/caption, multipart, that closes its connection after the answer."""
    boundary = "fcfs"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
                    for name, value in fields.items())
    body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return (f"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + body


def test_plain_and_streamed_requests_are_admitted_first_come_first_served(tmp_path):
    """Requests of both forms arriving in the same instant, alternately, more than there are rows: the
    streamed ones must not wait behind the plain ones (or the reverse). With 2 rows the requests run two
    by two, so the order in which they finish is the order in which they got a row."""
    pairs = 8
    # One preparing thread: images are prepared in the order their requests were admitted.
    env = {"PALIGEMMA_MAX_BATCH_SIZE": "2", "PALIGEMMA_PREPARE_WORKERS": "1"}
    with served(tmp_path, env=env) as server:
        parsed = urlparse(server.url)
        kinds = [kind for _ in range(pairs) for kind in ("plain", "stream")]
        requests = [_caption_request(jpeg(64, 48, seed=i), max_new_tokens="12", stream=str(kind == "stream"))
                    for i, kind in enumerate(kinds)]
        sockets = [socket.create_connection((parsed.hostname, parsed.port), timeout=60) for _ in kinds]
        finished: list[tuple[float, str, bytes]] = []

        def read(sock: socket.socket, kind: str) -> None:
            answer = _read_until_closed(sock)
            finished.append((time.monotonic(), kind, answer))

        try:
            time.sleep(0.5)  # every connection is accepted and idle: the requests arrive back to back
            readers = [threading.Thread(target=read, args=pair) for pair in zip(sockets, kinds, strict=True)]
            for reader in readers:
                reader.start()
            for sock, request in zip(sockets, requests, strict=True):
                sock.sendall(request)
            for reader in readers:
                reader.join(timeout=60)
        finally:
            for sock in sockets:
                sock.close()
        assert len(finished) == len(kinds) and all(answer.startswith(b"HTTP/1.1 200") for _, _, answer in finished)
        order = [kind for _, kind, _ in sorted(finished)]
        rank = {kind: sum(i for i, k in enumerate(order) if k == kind) / pairs for kind in ("plain", "stream")}
        # First come, first served, whatever the form: both finish spread through the run (mean ranks of
        # about 7.5 each). One form entirely first would put the two means 8 apart.
        assert abs(rank["stream"] - rank["plain"]) <= 3, " ".join(order)
