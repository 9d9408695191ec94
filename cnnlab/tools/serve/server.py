"""`cnnlab serve`: load the model, bind the socket, run uvicorn until SIGTERM or Ctrl-C.

The socket is bound here rather than by uvicorn so that a port in use is a
one-line CnnlabError before anything starts, and so that port 0 (any free port)
can be printed. On SIGTERM or SIGINT uvicorn stops accepting connections,
waits for the requests in flight (at most DRAIN_SECONDS), then runs the app's
shutdown, where the batcher finishes every batch already submitted.

With `workers` > 1 this process loads and checks the model, binds the socket,
then starts that many worker processes (uvicorn's supervisor: spawned, each
given the model's bytes and the socket, restarted if it dies). Each worker is a
whole server with its own batcher, so decoding requests, which holds Python's
lock, runs on every core; the model's threads are shared out among them.
SIGTERM reaches every worker, and each drains as above. /metrics adds up all the
workers' figures (metrics.py).
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.supervisors import Multiprocess

from cnnlab.errors import CnnlabError
from cnnlab.tools.serve.app import Settings, create_app
from cnnlab.tools.serve.backends import Backend, load_backend
from cnnlab.tools.serve.metrics import MULTIPROCESS_DIR

DRAIN_SECONDS = 30


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise CnnlabError(f"--port must be between 0 and 65535, got {port}")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CnnlabError(f"cannot listen on {host}:{port} ({reason}): choose another --port or --host") from None
    # Accepted connections inherit this. asyncio sets it itself only on sockets whose protocol
    # says TCP, which create_server's do not; without it Nagle's algorithm holds each small
    # answer back until the client's delayed ACK, ~40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def uvicorn_config(app: Any, workers: int = 1) -> uvicorn.Config:
    """uvicorn for `app` (an app, or with workers > 1 a picklable function that makes one), quiet per request
    (the request log is --log), draining for at most DRAIN_SECONDS."""
    return uvicorn.Config(app, lifespan="on", access_log=False, timeout_graceful_shutdown=DRAIN_SECONDS,
                          workers=workers, factory=workers > 1)  # fmt: skip


def uvicorn_server(app: object) -> uvicorn.Server:
    return uvicorn.Server(uvicorn_config(app))


def serve(source: Path, backend: str, host: str, port: int, settings: Settings, out: TextIO = sys.stderr) -> None:
    """Serve the model at `source` (a run, a checkpoint or a model.onnx) until stopped, in settings.workers
    processes."""
    workers = settings.workers
    loaded = load_backend(source, backend)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    processes = f", {workers} worker processes" if workers > 1 else ""
    print(f"cnnlab: serving {loaded.info.name} ({loaded.kind}, sha256 {loaded.sha256[:12]}{processes}) on {url}: "
          f"POST images to {url}/v1/predict, API at {url}/docs", file=out, flush=True)  # fmt: skip
    try:
        if workers == 1:
            app = create_app(loaded, settings)
            _freeze_start_up()
            uvicorn_server(app).run(sockets=[sock])
        else:
            _serve_in_workers(loaded, settings, sock)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down gracefully
        pass
    finally:
        sock.close()


def _serve_in_workers(loaded: Backend, settings: Settings, sock: socket.socket) -> None:
    workers = settings.workers
    threads = max(1, (os.cpu_count() or 1) // workers)  # the model's threads, per worker
    make_app = functools.partial(_worker_app, loaded.opener(threads), settings)
    metrics_dir = tempfile.mkdtemp(prefix="cnnlab-serve-metrics-")
    os.environ[MULTIPROCESS_DIR] = metrics_dir  # the workers inherit it, and count into files there
    try:
        _Workers(uvicorn_config(make_app, workers), sockets=[sock]).run()
    finally:
        del os.environ[MULTIPROCESS_DIR]
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_app(open_backend: Callable[[], Backend], settings: Settings) -> FastAPI:
    """In a worker process: the model loaded again from the bytes the main process checked, and its app."""
    app = create_app(open_backend(), settings)
    _freeze_start_up()
    return app


class _Workers(Multiprocess):
    """uvicorn's supervisor, which also retires a dead worker's live figures from /metrics when it replaces it."""

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {process.pid for process in self.processes}:
            mark_process_dead(pid)


def _freeze_start_up() -> None:
    # Loading the model (and exporting it in memory, which imports torch.onnx) leaves ~500,000 objects
    # that live as long as the server. Frozen, the collector never scans them again: unfrozen, each
    # full collection walked them all, a pause of 0.2-1.4 s (on 2 busy cores) that every request in
    # flight waited through, the whole of the p99 latency under load.
    gc.collect()
    gc.freeze()
