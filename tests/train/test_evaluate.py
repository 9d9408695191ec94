"""Evaluation: the model's own numbers, its batches split across a CPU's cores."""

import threading

import pytest
import torch
import torch.nn.functional as F

import cnnlab.train.evaluate as evaluation
from cnnlab.data.dataset import ImageDataset, Normalization
from cnnlab.models import create_model
from cnnlab.train.evaluate import EVAL_BATCH_SIZE, evaluate


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_evaluation_is_the_models_loss_and_predictions_with_each_batch_split_over_the_cores(two_threads, monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    n = EVAL_BATCH_SIZE + 188  # a full batch and a short one: 2 slices each
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    data = ImageDataset(images, torch.randint(10, (n,)), tuple("abcdefghij"))
    normalization = Normalization((0.3,), (0.35,))

    calls = []  # (thread, images, inference mode on) of each forward call
    fast_forward = evaluation.fast_forward

    def watched(model, device):
        forward = fast_forward(model, device)

        def call(x):
            calls.append((threading.get_ident(), len(x), torch.is_inference_mode_enabled()))
            return forward(x)

        return call

    monkeypatch.setattr(evaluation, "fast_forward", watched)
    result = evaluate(model.train(), data, normalization)

    assert model.training  # its mode restored
    assert sorted(size for _, size, _ in calls) == [94, 94, 256, 256]
    assert len({thread for thread, _, _ in calls}) == 2 and all(inference for _, _, inference in calls)
    with torch.no_grad():
        logits = model.eval()(normalization.apply(images))
    assert torch.equal(result.predictions, logits.argmax(dim=1))
    assert result.accuracy == (result.predictions == data.labels).double().mean().item()
    assert result.loss == pytest.approx(F.cross_entropy(logits.double(), data.labels).item(), rel=1e-5)
