"""`cnnlab serve`: load the model, bind the socket, run uvicorn until SIGTERM or Ctrl-C.

The socket is bound here rather than by uvicorn so that a port in use is a
one-line CnnlabError before anything starts, and so that port 0 (any free port)
can be printed. On SIGTERM or SIGINT uvicorn stops accepting connections,
waits for the requests in flight (at most DRAIN_SECONDS), then runs the app's
shutdown, where the batcher finishes every batch already submitted.
"""

from __future__ import annotations

import gc
import socket
import sys
from pathlib import Path
from typing import TextIO

import uvicorn

from cnnlab.errors import CnnlabError
from cnnlab.tools.serve.app import Settings, create_app
from cnnlab.tools.serve.backends import load_backend

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


def uvicorn_server(app: object) -> uvicorn.Server:
    """uvicorn for `app`, quiet per request (the request log is --log), draining for at most DRAIN_SECONDS."""
    config = uvicorn.Config(app, lifespan="on", access_log=False, timeout_graceful_shutdown=DRAIN_SECONDS)
    return uvicorn.Server(config)


def serve(source: Path, backend: str, host: str, port: int, settings: Settings, out: TextIO = sys.stderr) -> None:
    """Serve the model at `source` (a run, a checkpoint or a model.onnx) until stopped."""
    loaded = load_backend(source, backend)
    app = create_app(loaded, settings)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    print(f"cnnlab: serving {loaded.info.name} ({loaded.kind}, sha256 {loaded.sha256[:12]}) on {url}: "
          f"POST images to {url}/v1/predict, API at {url}/docs", file=out, flush=True)  # fmt: skip
    # Loading the model (and exporting it in memory, which imports torch.onnx) leaves ~500,000 objects
    # that live as long as the server. Frozen, the collector never scans them again: unfrozen, each
    # full collection walked them all, a pause of 0.2-1.4 s (on 2 busy cores) that every request in
    # flight waited through, the whole of the p99 latency under load.
    gc.collect()
    gc.freeze()
    try:
        uvicorn_server(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down gracefully
        pass
    finally:
        sock.close()
