"""The command line: parses arguments, calls the package, renders results and errors.

Every user mistake surfaces as a `CnnlabError`, printed here as one line
(`cnnlab: error: ...`) with exit status 2. Nothing in the package imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from cnnlab import __version__
from cnnlab.config import ENGINES, OPTIMIZERS, SCHEDULES, Resolution, TrainConfig, load_yaml_config, resolve
from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.train.checkpoint import Checkpoint

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other cnnlab error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CnnlabError(f"{message} (see `{self.prog} --help`)")


# Train flags and where each lands in TrainConfig ("optim.lr" is config.optim.lr).
_TRAIN_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"help": "model name (see `cnnlab models`); default lenet5"}),
    ("--dataset", "dataset", {"help": "dataset name or folder:PATH (see `cnnlab datasets`); default digits"}),
    ("--data-dir", "data_dir", {"help": "folder holding dataset sub-folders (else $CNNLAB_DATA)"}),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--lr", "optim.lr", {"type": float, "help": "peak learning rate"}),
    ("--optimizer", "optim.name", {"choices": OPTIMIZERS}),
    ("--momentum", "optim.momentum", {"type": float}),
    ("--nesterov", "optim.nesterov", {"action": argparse.BooleanOptionalAction}),
    ("--weight-decay", "optim.weight_decay", {"type": float}),
    ("--schedule", "optim.schedule", {"choices": SCHEDULES}),
    ("--step-size", "optim.step_size", {"type": int, "help": "epochs between decays (step schedule)"}),
    ("--gamma", "optim.gamma", {"type": float, "help": "decay factor (step schedule)"}),
    ("--warmup", "optim.warmup_fraction", {"type": float, "help": "one-cycle: share of the steps spent "
                                            "warming up to the peak rate; default 0.25"}),
    ("--grad-clip", "optim.grad_clip", {"type": float, "help": "max gradient norm; 0 = off"}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--ema", "ema", {"type": float, "help": "validate, save and test a moving average of the weights, "
                      "with this decay per step (e.g. 0.99); 0 = off"}),
    ("--val-fraction", "val_fraction", {"type": float}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {"help": "auto, cpu, cuda, cuda:N or mps"}),
    ("--engine", "engine", {"choices": ENGINES, "help": "autograd (PyTorch) or manual (cnnlab's own backprop)"}),
    ("--name", "name", {"help": "run directory name under --runs-dir"}),
    ("--runs-dir", "runs_dir", {}),
    ("--crop-padding", "augment.crop_padding", {"type": int, "help": "augment: random crop after padding"}),
    ("--flip", "augment.flip", {"action": argparse.BooleanOptionalAction, "help": "augment: horizontal flips"}),
    ("--rotate", "augment.rotate", {"type": float, "help": "augment: max rotation, degrees"}),
    ("--translate", "augment.translate", {"type": float, "help": "augment: max shift, fraction of size"}),
    ("--scale", "augment.scale", {"type": float, "help": "augment: max zoom, fraction"}),
    ("--erase", "augment.erase", {"type": float, "help": "augment: probability of random erasing"}),
    ("--strict", "strict_data", {"action": "store_true", "help": "folder: datasets: fail on unreadable images"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description="Train, inspect and ship convolutional image classifiers.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(commands)
    _add_tools(commands)
    _add_shipping(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model into a run directory",
        description="Train a model into a run directory. Options resolve in layers: the defaults, then cnnlab's "
        "tuned recipe for the model and dataset (if it has one), then --config, then flags.",
    )
    train.add_argument("--config", type=Path, help="YAML file of options; flags override it")
    for flag, dest, options in _TRAIN_FLAGS:
        train.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)
    train.add_argument(
        "--no-recipe", action="store_true", help="the plain defaults, without cnnlab's tuned recipe for the model and dataset"
    )
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this directory")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    train.add_argument("--json", action="store_true", help="print one JSON object with the results")
    train.set_defaults(handler=_train)


def _add_tools(commands: argparse._SubParsersAction) -> None:
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


def _add_shipping(commands: argparse._SubParsersAction) -> None:
    """export and serve: a trained model as files, and behind an HTTP API."""
    export = commands.add_parser(
        "export",
        help="write a run's model as ONNX, torch.export, TorchScript and safetensors files",
        description="Write the run's best model in each format, with model.json, MODEL_CARD.md and, for ONNX, "
        "a check against PyTorch in ONNX Runtime (model.onnx.check.json).",
    )
    export.add_argument("model", type=Path, metavar="RUN_OR_CHECKPOINT")
    export.add_argument("--format", help="comma-separated: onnx,pt2,torchscript,safetensors (default: all)")
    export.add_argument("--out", type=Path, help="folder for the files; default RUN/export")
    export.add_argument("--json", action="store_true", help="print one JSON object with the files and the check")
    export.set_defaults(handler=_export)

    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP: POST images, get classes",
        description="Serve a trained model over HTTP (FastAPI + uvicorn): POST images to /v1/predict; "
        "/v1/model, /healthz, /readyz, /metrics, API docs at /docs.",
    )
    serve.add_argument("model", type=Path, metavar="RUN|MODEL.onnx", help="a run, a checkpoint or a model.onnx")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; default 127.0.0.1 (this machine)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    serve.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                       help="onnx: ONNX Runtime (default); torch: the checkpoint, cnnlab's fast forward")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=64, help="images per model call and per request; default 64")
    serve.add_argument("--window-ms", type=float, default=2.0, help="how long a batch waits for requests; default 2")
    serve.add_argument("--max-body-mb", type=float, default=5.0, help="largest request body, MiB; default 5")
    serve.add_argument("--max-pending", type=int, default=256, help="requests waiting before 503; default 256")
    serve.add_argument("--log", type=Path, metavar="FILE", help="append one JSON line per request to FILE")
    serve.set_defaults(handler=_serve)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            status = args.handler(args) or 0
            sys.stdout.flush()  # a closed pipe shows here, not at exit as an unraisable error
            return status
    except CnnlabError as exc:
        print(f"cnnlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`cnnlab models | head`): stop quietly. stdout is pointed at
        # devnull so that the flush at exit does not fail again (the recipe in Python's signal docs).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as exc:
        # cnnlab is exiting: a further Ctrl-C must not cut the line below or turn the exit status
        # into death by signal (training has already put the default handler back).
        # Not put back: main() is the command line's entry point, and the process ends on return.
        import signal

        if hasattr(exc, "exit_status"):  # a signal training caught (loop.Interrupted)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Training raises loop.Interrupted, which says where the run stopped and how to continue it.
        print(f"cnnlab: {exc}" if str(exc) else "cnnlab: interrupted", file=sys.stderr)
        return getattr(exc, "exit_status", EXIT_INTERRUPTED)


def _train(args: argparse.Namespace) -> int:
    from cnnlab.train.loop import fit
    from cnnlab.train.progress import Progress
    from cnnlab.train.rundir import RunDirectory

    progress = Progress(stream=sys.stderr if args.json else sys.stdout)
    if args.resume is not None:
        run = RunDirectory.open(args.resume)
        checkpoint = run.resume_checkpoint  # last.pt, or the newest good one if it is damaged
        result = fit(_resumed_config(args, checkpoint, run_path=run.path), run, progress, resume=checkpoint)
    else:
        resolution = _resolve_new_run(args)
        config = resolution.config
        if resolution.recipe_applied or resolution.recipe_overridden:
            progress.message(_recipe_line(resolution))
        run = RunDirectory.create(Path(config.runs_dir) / (config.name or _run_name(config)), overwrite=args.overwrite)
        result = fit(config, run, progress)

    test = result.test.evaluation
    if args.json:
        _print_json({"run_dir": str(result.run_dir), "test_accuracy": test.accuracy, "test_loss": test.loss, "epochs": result.rows})
    else:
        print(f"test loss {test.loss:.4f}  test accuracy {100 * test.accuracy:.2f}%")
        print(f"run saved in {result.run_dir}")
    return 0


def _resolve_new_run(args: argparse.Namespace) -> Resolution:
    """The defaults, the recipe (unless --no-recipe), --config and the flags, resolved and validated."""
    file_options = load_yaml_config(args.config) if args.config else {}
    # Flags are typed by argparse and recipes are cnnlab's own, so a mistake can only be the file's.
    origin = str(args.config) if args.config else "config"
    return resolve(file_options, _flag_options(args), origin=origin, recipe=not args.no_recipe)


def _resumed_config(args: argparse.Namespace, checkpoint: Checkpoint, *, run_path: Path) -> TrainConfig:
    """The run's saved config, with the only flags a resumed run may change (--epochs, --device)."""
    flags = _flag_options(args)
    if flags.keys() - {"epochs", "device"} or args.no_recipe:
        raise CnnlabError("--resume continues a run with its saved options; only --epochs and --device may change")
    # The saved config names the options the run was made with; a recipe must not fill in
    # any it lacks (a checkpoint older than an option), as the run never had them.
    # Whether the run can go on (or only be finished) is fit's to say: cnnlab.train.loop.check_resumable.
    return resolve(checkpoint.config or {}, flags, origin=str(run_path), recipe=False).config


def _recipe_line(resolution: Resolution) -> str:
    """The recipe options that will run, then those a flag or --config overrode, with the values that will run.

    "tuned recipe for lenet5 on digits: batch_size=32, optim.lr=0.05 (epochs=15 overridden: 3)"
    """
    config = resolution.config
    applied = ", ".join(f"{key}={value}" for key, value in resolution.recipe_applied.items())
    overridden = ", ".join(
        f"{key}={recipe} overridden: {value}" for key, (recipe, value) in resolution.recipe_overridden.items()
    )
    line = f"tuned recipe for {config.model} on {config.dataset}: {applied or 'all of it overridden'}"
    return f"{line} ({overridden})" if overridden else line


def _run_name(config: TrainConfig) -> str:
    """model-dataset-time, with the characters a folder: dataset's path brings made safe for a folder name."""
    return f"{config.model}-{config.dataset.replace(':', '_').replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


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
        _print_json({"checkpoint": str(path), "run_dir": str(_run_dir_of(path)), "dataset": dataset_name,
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
        _print_json({"predictions": [{"image": str(p), **pred.to_dict()} for p, pred in zip(args.images, predictions)]})
        return 0
    for path, prediction in zip(args.images, predictions):
        ranked = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(prediction.classes, prediction.probabilities))
        print(f"{path}: {ranked}")
    return 0


@contextlib.contextmanager
def _needs_extra(command: str, extra: str) -> Iterator[None]:
    """A package of an optional extra missing (imported where it is used, even mid-command): one clear line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("cnnlab"):
            raise
        raise CnnlabError(f"cnnlab {command} needs {exc.name}: pip install 'cnnlab[{extra}]'") from None


def _export(args: argparse.Namespace) -> int:
    with _needs_extra("export", "export"):
        from cnnlab.tools.export import FORMATS, export_run

        formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else list(FORMATS)
        result = export_run(args.model, formats, args.out)
    if args.json:
        files = {f.format: {"path": str(f.path), "sha256": f.sha256} for f in result.files}
        _print_json({"out": str(result.out), "files": files, "onnx_check": result.onnx_check})
        return 0
    for f in result.files:
        print(f"{f.format:<12} {f.path}  sha256 {f.sha256[:16]}")
    if result.onnx_check:
        check = result.onnx_check
        print(f"ONNX Runtime vs PyTorch on {check['images']} images ({check['source']}): max |logit diff| "
              f"{check['max_abs_logit_diff']:.2e}, top-1 agreement {100 * check['top1_agreement']:.2f}%")  # fmt: skip
    print(f"model card and model.json in {result.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    with _needs_extra("serve", "serve"):
        from cnnlab.tools.serve.app import Settings
        from cnnlab.tools.serve.server import serve

        settings = Settings(max_batch=args.max_batch, window_ms=args.window_ms, max_body_mb=args.max_body_mb,
                            max_pending=args.max_pending, log=args.log)  # fmt: skip
        serve(args.model, args.backend, args.host, args.port, settings)
    return 0


def _models(args: argparse.Namespace) -> int:
    from cnnlab.models import all_models, count_parameters, create_model

    in_shape = _parse_shape(args.input)
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
    in_shape = _parse_shape(args.input.replace(",", "x"))
    report = check_model(args.model, in_shape, args.batch_size, args.classes, args.seed)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.table())
    return 0 if report.passed else 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cnnlab: warning: {message}", file=sys.stderr)


def _flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The train flags given on the command line, nested as in a config file: {"optim": {"lr": 0.1}}."""
    options: dict[str, Any] = {}
    for _, dest, _ in _TRAIN_FLAGS:
        if hasattr(args, dest):
            section, _, field = dest.rpartition(".")
            (options.setdefault(section, {}) if section else options)[field] = getattr(args, dest)
    return options


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CnnlabError(f"--input must look like 1x28x28 (channels x height x width), got '{text}'") from None
    return channels, height, width


def _run_dir_of(checkpoint_path: Path) -> Path:
    return checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(main())
