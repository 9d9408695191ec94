"""A real uvicorn server on 127.0.0.1: concurrent clients are batched together; a stop drains requests in flight."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import torch

from cnnlab.tools.serve.app import Settings, create_app
from cnnlab.tools.serve.server import bind, uvicorn_server
from tests.tools.serve.conftest import FakeBackend, metric, png_bytes, wait_until


@contextmanager
def running(backend, **settings):
    """uvicorn in a thread on a free port; yields the base URL and the server; stops it, bounded in time."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(create_app(backend, Settings(**settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True  # what SIGTERM does
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def test_32_concurrent_clients_all_succeed_in_shared_batches(onnx_backend, digit_files):
    image = digit_files[0].read_bytes()
    with running(onnx_backend, window_ms=20) as (url, _):
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)

        def post(i: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/predict", files={"file": (f"{i}.png", image, "image/png")}, timeout=20)

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(post, range(32)))
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 32
    assert len({str(r.json()["predictions"]) for r in responses}) == 1
    assert metric(metrics, "cnnlab_batch_size_sum") == 32
    assert metric(metrics, "cnnlab_batch_size_count") > metric(metrics, "cnnlab_batch_size_bucket", le="1.0")


def test_stopping_drains_the_requests_in_flight():
    backend = FakeBackend()
    image = png_bytes(torch.zeros((1, 8, 8), dtype=torch.uint8))
    with running(backend) as (url, server):
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
        backend.gate.clear()  # the next batch blocks in the model
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/predict", content=image,
                                 headers={"Content-Type": "image/png"}, timeout=20)  # fmt: skip
            wait_until(lambda: backend.calls == 3)  # the warm-up's two, then this request's
            server.should_exit = True
            threading.Timer(0.3, backend.gate.set).start()  # the model finishes after the stop began
            response = answer.result(timeout=20)
    assert response.status_code == 200 and response.json()["predictions"][0]["classes"] == ["b", "a"]


def test_accepted_connections_send_small_answers_at_once():
    """Nagle's algorithm is off on every accepted connection: with it on, each small answer waits
    for the client's delayed ACK (~40 ms a request)."""
    import socket

    listener = bind("127.0.0.1", 0)
    try:
        client = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()


def test_the_objects_of_start_up_are_frozen_before_serving(trained_run):
    """Full collections would otherwise walk every object of the loaded model and its libraries again
    and again: pauses of up to a second that every request in flight waits through."""
    import subprocess
    import sys

    script = (
        "import gc, sys\n"
        "from pathlib import Path\n"
        "from cnnlab.tools.serve import server\n"
        "from cnnlab.tools.serve.app import Settings\n"
        "class Started:\n"
        "    def run(self, sockets):\n"
        "        print(gc.get_freeze_count(), len(gc.get_objects()))\n"
        "server.uvicorn_server = lambda app: Started()\n"
        "server.serve(Path(sys.argv[1]), 'torch', '127.0.0.1', 0, Settings(), out=sys.stdout)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(trained_run)], capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    frozen, tracked = map(int, result.stdout.splitlines()[-1].split())
    assert frozen > 50_000 and tracked < frozen / 10
