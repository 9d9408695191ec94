"""A real uvicorn server on 127.0.0.1: concurrent clients are batched together; a stop drains requests in flight."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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


def worker_pids(pid: int) -> set[int]:
    """The child processes of `pid` that run a server (not multiprocessing's resource tracker)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                found.add(int(child))
    return found


def test_worker_processes_share_the_port_add_up_their_metrics_and_replace_a_dead_one(trained_run, digit_files):
    """`cnnlab serve --workers 2`: both workers warm before /readyz says ready; every request counted once in
    /metrics whichever worker answered it; a killed worker is replaced, its live figures retired; SIGTERM stops
    them all, draining, with exit status 0."""
    command = [sys.executable, "-m", "cnnlab", "serve", str(trained_run), "--port", "0", "--workers", "2"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        first_line = server.stderr.readline()
        assert "2 worker processes" in first_line, first_line
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", first_line).group(1)
        wait_until(lambda: _status(f"{url}/readyz") == 200, timeout=120)
        assert metric(httpx.get(f"{url}/metrics").text, "cnnlab_workers_ready") == 2
        workers = worker_pids(server.pid)
        assert len(workers) == 2

        image = digit_files[0].read_bytes()

        def post(i: int) -> int:
            files = {"file": (f"{i}.png", image, "image/png")}
            return httpx.post(f"{url}/v1/predict", files=files, timeout=30).status_code

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(post, range(48))) == [200] * 48
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "cnnlab_requests_total", route="/v1/predict", status="200") == 48
        assert metric(metrics, "cnnlab_batch_size_sum") == 48

        killed = min(workers)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(server.pid) - {killed}) == 2, timeout=60)
        wait_until(lambda: _status(f"{url}/readyz") == 200, timeout=120)
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "cnnlab_workers_ready") == 2  # the dead worker's 1 retired, its counts kept
        assert metric(metrics, "cnnlab_requests_total", route="/v1/predict", status="200") == 48

        serving_now = worker_pids(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in serving_now)
    finally:
        server.kill()
        server.wait()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None
