"""Predictor: the probabilities of the trained model itself, through the fast forward."""

import torch

from cnnlab.data.sources import load_splits
from cnnlab.tools.predict import Predictor


def test_predictions_are_the_models_softmax_top_k(trained_run):
    predictor = Predictor.load(trained_run)
    assert predictor.forward is not predictor.model  # LeNet-5 takes the fast path
    images = load_splits("digits", None, 0.1, 0).test.images[:64]  # (64, 1, 28, 28) uint8
    predictions = predictor.predict_batch(images, top_k=3)

    with torch.inference_mode():
        x = predictor.checkpoint.normalization.apply(images)
        expected = predictor.model(x).softmax(dim=1).topk(3, dim=1)
    assert [p.classes for p in predictions] == [[predictor.classes[i] for i in row] for row in expected.indices.tolist()]
    got = torch.tensor([p.probabilities for p in predictions])
    torch.testing.assert_close(got, expected.values, atol=1e-6, rtol=0)
