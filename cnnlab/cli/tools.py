"""The commands over trained runs, models and datasets: evaluate, predict, models, datasets, gradcheck."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab.cli.common import parse_shape, print_json, run_dir_of
from cnnlab.errors import CnnlabError

def add_commands(commands: argparse._SubParsersAction) -> None:
    """The commands over trained runs, models and datasets."""
    evaluate = commands.add_parser("evaluate", help="test a trained model: loss, accuracy, per-class figures")
    evaluate.add_argument("checkpoint", type=Path, metavar="RUN_OR_CHECKPOINT")
    evaluate.add_argument("--dataset", help="dataset to test on (default: the one it was trained on)")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("checkpoint", type=Path, metavar="RUN_OR_CHECKPOINT")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(handler=_predict)

    models = commands.add_parser("models", help="list the registered models")
    models.add_argument("--input", default="1x28x28", help="input shape CxHxW for the parameter counts")
    models.set_defaults(handler=_models)

    datasets = commands.add_parser("datasets", help="list datasets: where each was found, or how to get it")
    datasets.add_argument("--data-dir")
    datasets.add_argument("--download", metavar="NAME", help="fetch mnist, fashion-mnist, kmnist, cifar10 or cifar100")
    datasets.set_defaults(handler=_datasets)

    gradcheck = commands.add_parser("gradcheck", help="check hand-written gradients against autograd, layer by layer")
    gradcheck.add_argument("--model", default="lenet5", help="model name (see `cnnlab models`); default lenet5")
    gradcheck.add_argument("--input", default="1x28x28", help="input shape CxHxW (or C,H,W); default 1x28x28")
    gradcheck.add_argument("--classes", type=int, default=10, help="number of classes; default 10")
    gradcheck.add_argument("--batch-size", type=int, default=2, help="images in the test batch; default 2")
    gradcheck.add_argument("--seed", type=int, default=0)
    gradcheck.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    gradcheck.set_defaults(handler=_gradcheck)



def _evaluate(args: argparse.Namespace) -> int:
    from cnnlab.data.sources import get_source
    from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path
    from cnnlab.train.evaluate import report

    path = resolve_checkpoint_path(args.checkpoint)
    checkpoint = load_checkpoint(path)
    dataset_name = args.dataset or checkpoint.dataset
    _, test_split = get_source(dataset_name).load(Path(args.data_dir) if args.data_dir else None)
    differences = []  # what the model expects against what the dataset has, only where they differ
    if test_split.image_shape != checkpoint.in_shape:
        differences.append(f"images {checkpoint.in_shape}, '{dataset_name}' has {test_split.image_shape}")
    if len(test_split.classes) != len(checkpoint.classes):
        differences.append(f"{len(checkpoint.classes)} classes, '{dataset_name}' has {len(test_split.classes)}")
    elif test_split.classes != checkpoint.classes:
        ours, theirs = zip(*[(a, b) for a, b in zip(checkpoint.classes, test_split.classes) if a != b][:3])
        differences.append(f"classes {', '.join(map(repr, ours))}, where '{dataset_name}' has {', '.join(map(repr, theirs))}")
    if differences:
        raise CnnlabError(
            f"the model in {path} expects {'; and '.join(differences)}: evaluate it on the dataset it was trained "
            f"for ('{checkpoint.dataset}')"
        )
    result = report(checkpoint.build_model(), test_split, checkpoint.normalization)
    if args.json:
        print_json({"checkpoint": str(path), "run_dir": str(run_dir_of(path)), "dataset": dataset_name,
                     "test_accuracy": result.evaluation.accuracy, "test_loss": result.evaluation.loss,
                     **{k: v for k, v in result.to_dict().items() if k not in ("loss", "accuracy")}})  # fmt: skip
        return 0
    print(f"{path} on {dataset_name} test ({len(test_split)} images)")
    print(f"loss {result.evaluation.loss:.4f}  accuracy {100 * result.evaluation.accuracy:.2f}%")
    width = max(len(c) for c in checkpoint.classes)
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for c in result.per_class:
        print(f"{c.name:<{width}}  {c.precision:9.4f} {c.recall:7.4f} {c.f1:6.4f} {c.support:8d}")
    print("confusion matrix (rows true, columns predicted):")
    for row in result.confusion.tolist():
        print(" ".join(f"{v:5d}" for v in row))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from cnnlab.tools.predict import Predictor

    if args.top_k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {args.top_k}")
    predictor = Predictor.load(args.checkpoint)
    predictions = predictor.predict_files(args.images, args.top_k)
    if args.json:
        print_json({"predictions": [{"image": str(p), **pred.to_dict()} for p, pred in zip(args.images, predictions)]})
        return 0
    for path, prediction in zip(args.images, predictions):
        ranked = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(prediction.classes, prediction.probabilities))
        unlike = " (unlike the training images: do not trust this)" if prediction.out_of_distribution else ""
        print(f"{path}: {ranked}{unlike}")
    return 0



def _models(args: argparse.Namespace) -> int:
    from cnnlab.models import all_models, count_parameters, create_model

    in_shape = parse_shape(args.input)
    print(f"{'model':<14} {'parameters':>10}  (input {args.input}, 10 classes)")
    for spec in sorted(all_models(), key=lambda s: s.name):
        try:
            count = f"{count_parameters(create_model(spec.name, in_shape, 10)):,}"
        except CnnlabError:
            count = "too small"
        print(f"{spec.name:<14} {count:>10}  {spec.description}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from cnnlab.data.sources import all_sources

    data_dir = Path(args.data_dir) if args.data_dir else None
    if args.download:
        from cnnlab.data.download import download

        folder = download(args.download, data_dir, stream=sys.stdout)
        print(f"{args.download} is ready in {folder}")
        return 0
    for source in all_sources():
        if not source.files:
            where = "built in"
        else:
            folder = source.find(data_dir)
            where = f"found in {folder}" if folder else f"not found: {source.how_to_get}"
        print(f"{source.name:<14} {source.description}\n{'':<14} {where}")
    print(f"{'folder:PATH':<14} your own images, one sub-folder per class (options: folder:PATH,size=64,channels=1)")
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    """Exit 0 when every layer is within tolerance, 1 when one is not."""
    from cnnlab.backprop.gradcheck import check_model

    if args.batch_size < 1 or args.classes < 2:
        raise CnnlabError("gradcheck needs --batch-size >= 1 and --classes >= 2")
    in_shape = parse_shape(args.input.replace(",", "x"))
    report = check_model(args.model, in_shape, args.batch_size, args.classes, args.seed)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.table())
    return 0 if report.passed else 1


