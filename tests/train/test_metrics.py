import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support

from cnnlab.train.metrics import confusion_matrix, per_class_report


def test_confusion_and_per_class_figures_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (300,), generator=generator)
    predictions = torch.where(torch.rand(300, generator=generator) < 0.7, targets, torch.randint(0, 4, (300,), generator=generator))
    confusion = confusion_matrix(targets, predictions, 4)
    assert confusion.tolist() == sk_confusion(targets, predictions, labels=range(4)).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(targets, predictions, labels=range(4), zero_division=0)
    report = per_class_report(confusion, ("a", "b", "c", "d"))
    assert [r.precision for r in report] == pytest.approx(precision.tolist())
    assert [r.recall for r in report] == pytest.approx(recall.tolist())
    assert [r.f1 for r in report] == pytest.approx(f1.tolist())
    assert [r.support for r in report] == support.tolist()


def test_a_class_never_predicted_has_zero_precision_not_nan():
    confusion = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3)
    report = per_class_report(confusion, ("a", "b", "c"))
    assert (report[1].precision, report[1].recall, report[1].f1) == (0.0, 0.0, 0.0)
    assert report[2].support == 0
