"""SlicedStep: a batch split across cores trains as the whole batch does, in both engines: same loss,
logits and update, up to rounding."""

import copy

import pytest
import torch

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.engine.autograd import AutogradEngine
from cnnlab.engine.manual import ManualEngine
from cnnlab.fast.slices import sliced
from cnnlab.models import create_model

CONFIG = TrainConfig(optim=OptimConfig(lr=0.05, grad_clip=2.0), label_smoothing=0.1)


def engines(slices: tuple[int, ...]) -> list[AutogradEngine]:
    """One LeNet-5 engine per entry, all from the same weights, each cutting batches into that many slices."""
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    return [AutogradEngine(copy.deepcopy(model), CONFIG, slices=count) for count in slices]


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


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.parametrize("grad_clip", [0.0, 0.02], ids=["no clipping", "clipped"])
def test_the_update_is_the_textbook_step_on_the_whole_batch(slices, grad_clip):
    """loss.backward() on the batch mean, clip_grad_norm_, SGD: what the engine's step must equal."""
    config = TrainConfig(optim=OptimConfig(lr=0.05, grad_clip=grad_clip), label_smoothing=0.1)
    torch.manual_seed(0)
    reference = create_model("lenet5", (1, 28, 28), 10)
    engine = AutogradEngine(copy.deepcopy(reference), config, slices=slices)
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
        assert (whole.step.slices, split.step.slices) == (1, 2)
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

