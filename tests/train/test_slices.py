"""A batch split across cores trains as the whole batch does: same loss, logits and update, up to rounding."""

import copy
import threading

import pytest
import torch
from torch import nn

from cnnlab.backprop.engine import ManualEngine
from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.models import create_model
from cnnlab.train.engine import AutogradEngine
from cnnlab.train.slices import MIN_SLICE, map_slices, slice_count, sliced, splittable

CONFIG = TrainConfig(optim=OptimConfig(lr=0.05, grad_clip=2.0), label_smoothing=0.1)


def engines(slices: tuple[int, ...]) -> list[AutogradEngine]:
    """One LeNet-5 engine per entry, all from the same weights, each cutting batches into that many slices."""
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    made = []
    for count in slices:
        engine = AutogradEngine(copy.deepcopy(model), CONFIG)
        engine.slices = count
        made.append(engine)
    return made


def batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 28, 28, generator=generator), torch.randint(10, (size,), generator=generator))
            for _ in range(steps)]  # fmt: skip


@pytest.mark.parametrize("slices, batch", [(2, 256), (3, 200)], ids=["2 even slices", "3 uneven slices"])
def test_a_sliced_step_is_the_whole_batchs_step_up_to_rounding(slices, batch):
    whole, split = engines((1, slices))
    for x, y in batches(3, batch):
        with sliced(batch, slices) as count:
            assert count == slices  # the batch really is cut
        loss_whole, logits_whole = whole.train_step(x, y, 0.05)
        loss_split, logits_split = split.train_step(x, y, 0.05)
        torch.testing.assert_close(loss_split, loss_whole, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits_split, logits_whole, rtol=1e-5, atol=1e-5)
    moved = 0.0
    for (name, p_whole), p_split, p_start in zip(
        whole.model.named_parameters(), split.model.parameters(), engines((1,))[0].model.parameters()
    ):
        torch.testing.assert_close(p_split, p_whole, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((p_whole - p_start).detach().abs().max()))
    assert moved > 1e-3  # the steps did change the weights


def test_a_sliced_run_repeats_bit_for_bit():
    first, second = engines((2, 2))
    for x, y in batches(3, 256):
        assert torch.equal(first.train_step(x, y, 0.05)[0], second.train_step(x, y, 0.05)[0])
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


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


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.parametrize("grad_clip", [0.0, 0.02], ids=["no clipping", "clipped"])
def test_the_update_is_the_textbook_step_on_the_whole_batch(slices, grad_clip):
    """loss.backward() on the batch mean, clip_grad_norm_, SGD: what the engine's step must equal."""
    config = TrainConfig(optim=OptimConfig(lr=0.05, grad_clip=grad_clip), label_smoothing=0.1)
    torch.manual_seed(0)
    reference = create_model("lenet5", (1, 28, 28), 10)
    engine = AutogradEngine(copy.deepcopy(reference), config)
    engine.slices = slices
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for x, y in batches(2, 256):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(x), y, label_smoothing=0.1)
        loss.backward()
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
            assert norm > 2 * grad_clip  # the clipping does bite
        optimizer.step()
        engine_loss, _ = engine.train_step(x, y, 0.05)
        torch.testing.assert_close(engine_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, expected), actual in zip(reference.named_parameters(), engine.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_the_hand_written_engine_slices_its_batch_too_with_a_network_twin_per_slice():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = ManualEngine(copy.deepcopy(model), CONFIG)
        torch.set_num_threads(2)
        split = ManualEngine(copy.deepcopy(model), CONFIG)
        assert (whole.slices, split.slices) == (1, 2)
        for x, y in batches(3, 256):
            loss_whole, logits_whole = whole.train_step(x, y, 0.05)
            loss_split, logits_split = split.train_step(x, y, 0.05)
            torch.testing.assert_close(loss_split, loss_whole, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(logits_split, logits_whole, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)
    for (name, p_whole), p_split, p_start in zip(
        whole.model.named_parameters(), split.model.parameters(), model.parameters()
    ):
        torch.testing.assert_close(p_split, p_whole, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p_whole, p_start), name  # every parameter moved
