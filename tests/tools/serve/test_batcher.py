"""The micro-batcher on its own: gathering, the size limit, refusing beyond max_pending, draining on close."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from cnnlab.tools.serve.batcher import Batcher, Overloaded


def images(n: int, value: int) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), value, dtype=torch.uint8)


class Recorder:
    """A batch function that returns each image's value and remembers the batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        self.threads.add(threading.current_thread().name)
        return x.flatten(1)[:, 0].to(torch.int64)


def test_concurrent_requests_share_batches_up_to_max_batch_and_get_their_own_rows():
    run = Recorder()

    async def scenario():
        batcher = Batcher(run, max_batch=8, window=0.05, max_pending=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(images(1 + i % 3, i)) for i in range(10)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    for i, rows in enumerate(results):
        assert rows.tolist() == [i] * (1 + i % 3)
    assert sum(run.sizes) == sum(1 + i % 3 for i in range(10)) and max(run.sizes) <= 8 and len(run.sizes) < 10
    assert all(name.startswith("cnnlab-batch") for name in run.threads)  # the worker thread, off the event loop


def test_beyond_max_pending_submit_refuses_at_once():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch=64, window=0.2, max_pending=2)
        batcher.start()
        waiting = [asyncio.create_task(batcher.submit(images(1, i))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(images(1, 9))
        done = await asyncio.gather(*waiting)
        await batcher.close()
        return done

    assert [rows.tolist() for rows in asyncio.run(scenario())] == [[0], [1]]


def test_close_finishes_what_was_submitted_then_refuses():
    run = Recorder()

    async def scenario():
        batcher = Batcher(run, max_batch=4, window=0.5, max_pending=100)
        batcher.start()
        waiting = [asyncio.create_task(batcher.submit(images(3, i))) for i in range(3)]
        await asyncio.sleep(0)
        await batcher.close()  # does not wait out the window, but runs every batch
        assert all(task.done() for task in waiting)
        with pytest.raises(Overloaded):
            await batcher.submit(images(1, 0))
        return [task.result().tolist() for task in waiting]

    assert asyncio.run(scenario()) == [[0] * 3, [1] * 3, [2] * 3]
    assert run.sizes == [3, 3, 3]


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    calls = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x.flatten(1)[:, 0]

    async def scenario():
        batcher = Batcher(run, max_batch=4, window=0, max_pending=10)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(images(1, 1))
        rows = await batcher.submit(images(1, 2))
        await batcher.close()
        return rows.tolist()

    assert asyncio.run(scenario()) == [2]
