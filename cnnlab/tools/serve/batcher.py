"""Micro-batching: requests that arrive together run through the model as one batch.

A batch opens when its first request arrives and closes `window` seconds later,
or as soon as it holds `max_batch` images; requests are never split, and a
request that does not fit waits for the next batch. One worker thread runs
the batches, so the event loop stays free to read requests and answer /healthz
while the model works, and the model (ONNX Runtime's or PyTorch's threads) has
the CPU to itself. Beyond `max_pending` requests waiting for a batch, `submit`
refuses at once (Overloaded): a server that is behind answers 503 instead of
growing an unbounded queue and a latency nobody waits for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

# images (N, C, H, W) uint8, the requests of one batch stacked -> (N, ...) one row of results per image
RunBatch = Callable[[torch.Tensor], torch.Tensor]


class Overloaded(Exception):
    """More requests are waiting than the batcher accepts, or it is shutting down."""


@dataclass
class _Job:
    images: torch.Tensor  # (n, C, H, W) uint8
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, run: RunBatch, max_batch: int, window: float, max_pending: int,
                 on_pending: Callable[[int], object] = lambda n: None) -> None:  # fmt: skip
        """on_pending(n): told the number of waiting requests whenever it changes (a metrics gauge)."""
        self.run = run
        self.on_pending = on_pending
        self.max_batch = max_batch
        self.window = window
        self.max_pending = max_pending
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-batch")

    @property
    def pending(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name="cnnlab-batcher")

    async def call(self, function: Callable[[], object]) -> object:
        """`function()` on the worker thread, between batches (the warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def submit(self, images: torch.Tensor) -> torch.Tensor:
        """images: (n, C, H, W) uint8, 1 <= n <= max_batch -> this request's n rows of `run`'s result."""
        if self._closing or self._task is None:
            raise Overloaded("the server is shutting down")
        if len(self._queue) >= self.max_pending:
            raise Overloaded(f"{len(self._queue)} requests are already waiting: try again in a moment")
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self.on_pending(len(self._queue))
        self._arrived.set()
        return await job.future

    async def close(self) -> None:
        """Finish every request already submitted, then stop the task and the worker thread."""
        self._closing = True
        if self._task is not None:
            self._arrived.set()
            await self._task
        self._executor.shutdown(wait=True)

    async def _serve(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill_window()
            jobs = self._take_batch()
            if jobs:
                await self._run(jobs)

    async def _fill_window(self) -> None:
        """Wait until the oldest request has waited `window`, or a full batch is queued."""
        deadline = self._queue[0].arrived + self.window
        while sum(len(job.images) for job in self._queue) < self.max_batch and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        """The oldest requests whose images fit in max_batch (always at least one), skipping abandoned ones."""
        jobs: list[_Job] = []
        size = 0
        while self._queue and (not jobs or size + len(self._queue[0].images) <= self.max_batch):
            job = self._queue.popleft()
            if not job.future.done():  # a client that went away cancels its future
                jobs.append(job)
                size += len(job.images)
        self.on_pending(len(self._queue))
        return jobs

    async def _run(self, jobs: list[_Job]) -> None:
        images = torch.cat([job.images for job in jobs])  # (N, C, H, W) uint8
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, images)
        except Exception as exc:  # a failing batch fails its requests, not the batcher
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(results[start : start + len(job.images)])
            start += len(job.images)
