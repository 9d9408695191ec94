"""The HTTP application: `create_app(backend, settings)`, the model loaded once, five-line routes.

POST /v1/predict    images (multipart field `file`, repeatable, or a raw image/* body) -> top-k classes
GET  /v1/model      what the model is: classes, input, normalization, test accuracy, backend, sha256
GET  /healthz       the process answers;  GET /readyz  the model is loaded and warmed up, in every worker
                    process (503 before)
GET  /metrics       Prometheus text format (metrics.py);  GET /docs  OpenAPI;  GET /  a page

A request body is counted while it is read, whatever its Content-Length says,
and images are decoded by `cnnlab.data.images` (open_image, then image_input), the code path of
`cnnlab predict`, which checks the pixel count in the header before decoding and
frames each image as the training images were (cnnlab/data/preprocess.py). Each
prediction carries `out_of_distribution`, the model's calibrated flag for inputs
unlike its training data (cnnlab/train/calibrate.py; null without one).
Every refusal is JSON {"error": "...", "reason": "..."} and is counted by reason.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

import cnnlab
from cnnlab.data.images import MAX_PIXELS, NOT_AN_IMAGE, TOO_LARGE, TOO_MANY_PIXELS, ImageError, image_input, open_image
from cnnlab.errors import CnnlabError
from cnnlab.tools.predict import Prediction, top_predictions
from cnnlab.tools.serve.backends import Backend
from cnnlab.tools.serve.batcher import Batcher, Overloaded
from cnnlab.tools.serve.metrics import Metrics
from cnnlab.tools.serve.requestlog import RequestLog

BAD_REQUEST, OVERLOADED = "bad_request", "overloaded"
STATUS = {TOO_LARGE: 413, TOO_MANY_PIXELS: 413, NOT_AN_IMAGE: 415, BAD_REQUEST: 422, OVERLOADED: 503}
RAW_TYPES = ("image/", "application/octet-stream")  # a body that is the image itself
# Requests of at most this many pixels in all are decoded on the event loop (~0.25 ms at most): a hand-off to
# a thread cost more than decoding a 28x28 image, and held the loop's lock as long. Larger ones go to a thread.
INLINE_PIXELS = 128 * 128
# The page fetches nothing but this server's API, so it works offline; the browser holds it to that.
PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:"


@dataclass(frozen=True)
class Settings:
    max_batch: int = 64  # images per model call, and per request
    window_ms: float = 2.0  # how long a batch waits for more requests
    max_body_mb: float = 5.0
    max_pending: int = 256  # requests waiting for a batch before 503
    max_pixels: int = MAX_PIXELS  # per image, read from its header
    log: Path | None = None  # JSON-lines request log
    workers: int = 1  # server processes (cnnlab/tools/serve/server.py)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_pending < 1 or self.max_pixels < 1:
            raise CnnlabError("--max-batch and --max-pending must be at least 1")
        if not 1 <= self.workers <= 64:
            raise CnnlabError(f"--workers must be between 1 and 64, got {self.workers}")
        if not 0 <= self.window_ms <= 1000:
            raise CnnlabError(f"--window-ms must be between 0 and 1000, got {self.window_ms}")
        if not 0 < self.max_body_mb <= 1024:
            raise CnnlabError(f"--max-body-mb must be above 0 and at most 1024, got {self.max_body_mb}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class Rejected(Exception):
    """A request the server refuses: answered with STATUS[reason] and {"error": message, "reason": reason}."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Service:
    """The model behind the routes: batching, pre- and post-processing, metrics, the log."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.info = backend.info
        self.settings = settings
        self.metrics = Metrics(self.info.classes)
        self.batcher = Batcher(self.run_batch, settings.max_batch, settings.window_ms / 1000, settings.max_pending,
                               self.metrics.pending.set)  # fmt: skip
        self.log = RequestLog(settings.log) if settings.log else None
        self.warm = False  # this process

    @property
    def ready(self) -> bool:
        """Warm in every worker process (each counts itself into the metrics once warm)."""
        return self.warm and self.metrics.workers_ready() >= self.settings.workers

    def run_batch(self, images: torch.Tensor) -> torch.Tensor:
        """On the batcher's thread: images (N, C, H, W) uint8 -> (N, K) float32 probabilities."""
        x = self.info.normalization.apply(images)  # (N, C, H, W) float32, as in training
        probabilities = self.backend.logits(x).softmax(dim=1)
        flags = None if self.info.ood is None else self.info.ood.flags(probabilities)  # (N,) bool
        self.metrics.batch(x, probabilities.argmax(dim=1), flags)
        return probabilities

    async def warm_up(self) -> None:
        """A batch of 1 and one of max_batch through normalization and model (first calls compile, allocate and
        pick kernels: ~0.5 s on the first request otherwise), uncounted in the metrics; then ready."""
        normalize, logits = self.info.normalization.apply, self.backend.logits
        for n in dict.fromkeys((1, self.settings.max_batch)):
            images = torch.zeros(n, *self.info.in_shape, dtype=torch.uint8)
            await self.batcher.call(lambda images=images: logits(normalize(images)))
        self.metrics.ready.set(1)
        self.warm = True

    async def predict(self, images: torch.Tensor, top_k: int) -> list[Prediction]:
        """images: (n, C, H, W) uint8 -> n predictions, top_k classes each, most likely first (as Predictor)."""
        try:
            probabilities = await self.batcher.submit(images)  # (n, K)
        except Overloaded as exc:
            raise Rejected(OVERLOADED, f"the server is overloaded: {exc}") from None
        return top_predictions(probabilities, self.info.classes, top_k, self.info.ood)

    def describe(self) -> dict[str, Any]:
        return {**self.info.to_dict(), "backend": self.backend.kind, "sha256": self.backend.sha256,
                "max_batch": self.settings.max_batch}  # fmt: skip

    def observe(self, route: str, status: int, seconds: float, state: dict[str, Any]) -> None:
        """One answered request, into the metrics and the log (`state`: what the route noted, if anything)."""
        self.metrics.request(route, status, seconds)
        if self.log is not None:
            extra = {key: state[key] for key in ("classes", "reason") if key in state}
            self.log.write(route, status, 1000 * seconds, **extra)

    async def read_images(self, request: Request) -> torch.Tensor:
        """The request's images, decoded: (n, C, H, W) uint8 in the model's input shape, 1 <= n <= max_batch."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:  # refused before reading a byte
            raise Rejected(TOO_LARGE, self._too_large())
        body = self._limited(request.stream())
        if media_type == "multipart/form-data":
            blobs = await self._multipart_files(request.headers, body)
        elif media_type.startswith(RAW_TYPES):
            blobs = [b"".join([chunk async for chunk in body])]
        else:
            raise Rejected(NOT_AN_IMAGE, f"Content-Type '{media_type}' is not an image: send images as multipart "
                           "field 'file', or one image as the body with Content-Type image/*")  # fmt: skip
        images = self._open(blobs)
        if sum(image.width * image.height for _, image in images) <= INLINE_PIXELS:
            return self._decode(images)
        return await run_in_threadpool(self._decode, images)

    def _open(self, blobs: list[bytes]) -> list[tuple[str, Image.Image]]:
        """Each image's name in messages, and the image with its header read and its pixel count checked."""
        names = ["upload"] if len(blobs) == 1 else [f"upload {i + 1}" for i in range(len(blobs))]
        opened = []
        try:
            for blob, name in zip(blobs, names):
                opened.append((name, open_image(blob, name, self.settings.max_pixels)))
        except ImageError as exc:
            for _, image in opened:
                image.close()
            raise Rejected(exc.reason, str(exc)) from None
        return opened

    def _decode(self, images: list[tuple[str, Image.Image]]) -> torch.Tensor:
        """Opened images -> (n, C, H, W) uint8 in the model's input shape, framed as in training; closes them."""
        try:
            return torch.stack([image_input(image, self.info.in_shape, name, self.info.framing)
                                for name, image in images])  # fmt: skip
        except ImageError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        finally:
            for _, image in images:
                image.close()

    async def _limited(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`stream`, refused once it passes the byte limit: a missing or lying Content-Length changes nothing."""
        total = 0
        async for chunk in stream:
            total += len(chunk)
            if total > self.settings.max_body_bytes:
                raise Rejected(TOO_LARGE, self._too_large())
            yield chunk

    async def _multipart_files(self, headers: Headers, body: AsyncIterator[bytes]) -> list[bytes]:
        parser = MultiPartParser(headers, body, max_files=self.settings.max_batch, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise Rejected(BAD_REQUEST, f"malformed multipart body: {exc.message}") from None
        try:
            uploads = form.getlist("file")
            if not uploads or not all(isinstance(upload, UploadFile) for upload in uploads):
                raise Rejected(BAD_REQUEST, "send each image as a file in multipart field 'file'")
            return [await upload.read() for upload in uploads]
        finally:
            await form.close()

    def _too_large(self) -> str:
        return f"the request body is over the {self.settings.max_body_mb:g} MiB limit"


# The request body /docs offers, since the route reads its body itself.
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}  # fmt: skip


def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    """The application over a loaded backend; the model is warmed up in the background after start-up."""
    service = Service(backend, settings or Settings())
    info = service.info
    page = (resources.files(__package__) / "page.html").read_text(encoding="utf-8")
    c, h, w = info.in_shape
    page = page.replace("{{model}}", html.escape(info.name)).replace("{{dataset}}", html.escape(info.dataset))
    page = page.replace("{{input}}", f"{c}x{h}x{w} ({'grey' if c == 1 else 'RGB'})")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        warm_up = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:  # uvicorn has drained the requests in flight; the batcher finishes what they submitted
            await warm_up
            await service.batcher.close()
            if service.log is not None:
                service.log.close()

    app = FastAPI(title=f"cnnlab serve: {info.name}", version=cnnlab.__version__, lifespan=lifespan,
                  description=f"{info.name} trained on {info.dataset}: classes {', '.join(info.classes)}")  # fmt: skip
    app.state.service = service
    app.add_middleware(_Observe, service=service)
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _no_such_route)

    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="classes per image")) -> JSONResponse:
        """Classify images: multipart field `file` (repeatable) or one raw image body; answers in request order."""
        predictions = await service.predict(await service.read_images(request), top_k)
        request.state.classes = [p.classes[0] for p in predictions]
        # A response rather than a dict: FastAPI would walk a dict through jsonable_encoder and validate it first,
        # time that plain str and float values do not need.
        return JSONResponse({"model": info.name, "predictions": [p.to_dict() for p in predictions]})

    @app.get("/v1/model")
    async def model() -> dict:
        return service.describe()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.ready
        return JSONResponse({"status": "ready" if ready else "warming up"}, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        page_here = page.replace("{{base}}", html.escape(str(request.base_url)))
        return HTMLResponse(page_here, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
    request.app.state.service.metrics.reject(exc.reason)
    request.state.reason = exc.reason
    headers = {"Retry-After": "1"} if exc.reason == OVERLOADED else None
    return JSONResponse({"error": exc.message, "reason": exc.reason}, STATUS[exc.reason], headers=headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a bad top_k) in the same shape as every other refusal."""
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return await _rejected(request, Rejected(BAD_REQUEST, message))


async def _no_such_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The router's own refusals (an unknown path: 404; a method the route does not take: 405, with its Allow
    header) in the shape of every other one. They are not inputs refused, so /metrics does not count them there."""
    path = request.url.path
    reason, message = {
        404: ("not_found", f"no route {path}: the routes are listed at /docs"),
        405: ("method_not_allowed", f"{path} does not take {request.method}: see /docs"),
    }.get(exc.status_code, ("http_error", str(exc.detail)))
    return JSONResponse({"error": message, "reason": reason}, exc.status_code, headers=exc.headers)


class _Observe:
    """ASGI middleware: each HTTP request's route, status and latency into the metrics and the log."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        state = scope.setdefault("state", {})  # where request.state writes

        async def send_observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # The route's template, never the raw path: unknown paths must not create new series.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.service.observe(route, status, time.perf_counter() - start, state)
