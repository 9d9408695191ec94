"""Slicing a batch across cores: slices run at once, each with its share of the threads, and only models
that treat images independently are split. (That a sliced step equals the whole batch's: tests/engine.)"""

import threading

import pytest
import torch
from torch import nn

from cnnlab.fast.slices import MIN_SLICE, map_slices, slice_count, sliced, splittable
from cnnlab.models import create_model


def test_slices_run_at_once_on_separate_threads_with_a_share_of_the_intra_op_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    barrier = threading.Barrier(2, timeout=10)  # both slices must be running for either to pass it

    def work(i, x, y):
        barrier.wait()
        return threading.get_ident(), torch.get_num_threads(), x.sum().item(), len(y), i

    try:
        x, y = torch.arange(200.0), torch.arange(200)
        with sliced(200, 2) as count:
            results = map_slices(work, x, y, count)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(previous)
    assert [r[3] for r in results] == [100, 100]
    assert sum(r[2] for r in results) == x.sum().item()
    assert results[0][0] == threading.get_ident() != results[1][0]  # the caller takes the first slice
    assert [r[1] for r in results] == [1, 1]
    assert [r[4] for r in results] == [0, 1]


def test_a_batch_too_small_to_split_stays_whole_and_keeps_the_thread_count():
    before = torch.get_num_threads()
    with sliced(2 * MIN_SLICE - 1, 4) as count:
        assert count == 1 and torch.get_num_threads() == before
    with sliced(3 * MIN_SLICE, 4) as count:
        assert count == 3


def test_a_failing_slice_raises_in_the_caller_after_every_slice_has_finished():
    finished = []

    def work(i, x, y):
        if x[0] == 0:
            raise ValueError("slice 0 failed")
        threading.Event().wait(0.2)
        finished.append(len(x))
        return len(x)

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="slice 0 failed"):
        with sliced(256, 2) as count:
            map_slices(work, torch.arange(256), torch.arange(256), count)
    assert finished == [128]  # the other slice ran to its end before the error came out
    assert torch.get_num_threads() == before


def test_only_models_that_treat_images_independently_are_split():
    assert splittable(create_model("lenet5", (1, 28, 28), 10))
    assert not splittable(create_model("resnet20", (3, 32, 32), 10))  # batch-norm statistics span the batch
    assert not splittable(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))  # draws from the shared generator
    assert slice_count(create_model("resnet20", (3, 32, 32), 10), "cpu") == 1
    assert slice_count(create_model("lenet5", (1, 28, 28), 10), "meta") == 1  # a CPU's cores only
    expected = min(torch.get_num_threads(), 4)
    assert slice_count(create_model("lenet5", (1, 28, 28), 10), "cpu") == expected
