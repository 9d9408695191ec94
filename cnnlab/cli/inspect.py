"""inspect and report: a model's layers, what a trained model sees in an image, and a run's report.html."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.cli.common import parse_shape, print_json, run_dir_of
from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from torch import nn

    from cnnlab.tools.inspect import LayerTable
    from cnnlab.train.checkpoint import Checkpoint


def add_commands(commands: argparse._SubParsersAction) -> None:
    """inspect and report."""
    inspect = commands.add_parser(
        "inspect",
        help="a model's layers: output shapes, parameters, multiply-adds, receptive fields; with --image, "
        "what a trained model sees",
        description="Print the layer table of a registered model (untrained) or of a run's model. With --image, "
        "write what the run's model sees in the image: the image as preprocessed, every convolution's feature "
        "maps, a saliency map and Grad-CAM, as PNGs, and print the top classes.",
    )
    inspect.add_argument("target", metavar="MODEL|RUN", help="a model name (see `cnnlab models`), a run or a checkpoint")
    inspect.add_argument("--input", help="input shape CxHxW for a model name; default 1x28x28 (a run has its own)")
    inspect.add_argument("--classes", type=int, default=10, help="number of classes for a model name; default 10")
    inspect.add_argument("--image", type=Path, metavar="FILE", help="an image to explain (needs a run)")
    inspect.add_argument("--layer", help="the convolution for Grad-CAM; default the last")
    inspect.add_argument("--top-k", type=int, default=3)
    inspect.add_argument("--out", type=Path, help="folder for --image's PNGs; default RUN/inspect/IMAGE-NAME")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_inspect)

    report = commands.add_parser(
        "report",
        help="write a run's report.html: one self-contained page of its results and what its model learned",
        description="Write RUN/report.html (or --out): config, curves, per-class table, confusion matrix, the most "
        "confident mistakes, first-layer filters, feature maps, gradient flow and the layer table, images embedded.",
    )
    report.add_argument("run", type=Path, metavar="RUN")
    report.add_argument("--out", type=Path, help="where to write the page; default RUN/report.html")
    report.set_defaults(handler=_report)


def _inspect(args: argparse.Namespace) -> int:
    from cnnlab.models import create_model, get_model_spec
    from cnnlab.tools.inspect import layer_table

    if not Path(args.target).exists():
        if args.image is not None:
            raise CnnlabError(f"--image needs a trained run, and '{args.target}' is not a run directory or checkpoint")
        try:
            get_model_spec(args.target)
        except CnnlabError:
            raise CnnlabError(
                f"'{args.target}' is neither a run directory, a checkpoint nor a model name: pass a run "
                "(runs/NAME) or one of the models `cnnlab models` lists"
            ) from None
        in_shape = parse_shape(args.input or "1x28x28")
        table = layer_table(create_model(args.target, in_shape, args.classes), in_shape)
        return _print_table(table, args.target, args.json)
    if args.input is not None:
        raise CnnlabError("--input is for a model name: a run's model takes the input shape it was trained on")
    from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path

    path = resolve_checkpoint_path(Path(args.target))
    checkpoint = load_checkpoint(path)
    model = checkpoint.build_model()
    if args.image is None:
        return _print_table(layer_table(model, checkpoint.in_shape), checkpoint.model["name"], args.json)
    return _explain_image(args, checkpoint, model, run_dir_of(path))


def _print_table(table: LayerTable, model_name: str, as_json: bool) -> int:
    if as_json:
        print_json({"model": model_name, **table.to_dict()})
    else:
        print(f"{model_name} on {'x'.join(map(str, table.in_shape))} images (per image)")
        print(table.text())
    return 0


def _explain_image(args: argparse.Namespace, checkpoint: Checkpoint, model: nn.Module, run_dir: Path) -> int:
    from cnnlab.data.images import load_image
    from cnnlab.tools.attribution import explain, write_explanation
    from cnnlab.tools.export import ModelInfo
    from cnnlab.tools.predict import top_predictions

    if args.top_k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {args.top_k}")
    info = ModelInfo.of(checkpoint, None)  # the framing and out-of-distribution check `cnnlab predict` applies
    image = load_image(args.image, checkpoint.in_shape, info.framing)  # (C, H, W) uint8, as `cnnlab predict` reads it
    explanation = explain(model, checkpoint.normalization.apply(image[None]), layer=args.layer)
    (top,) = top_predictions(explanation.probabilities[None], checkpoint.classes, args.top_k, info.ood)
    folder = args.out or run_dir / "inspect" / args.image.stem
    files = write_explanation(explanation, image, folder)
    if args.json:
        print_json({"image": str(args.image), **top.to_dict(), "explained_class": checkpoint.classes[explanation.target],
                    "gradcam_layer": explanation.gradcam_layer, "files": [str(f) for f in files]})  # fmt: skip
        return 0
    ranked = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(top.classes, top.probabilities))
    print(f"{args.image}: {ranked}")
    print(f"Grad-CAM on layer {explanation.gradcam_layer} for '{checkpoint.classes[explanation.target]}'")
    print(f"wrote {len(files)} PNGs to {folder}: {', '.join(f.name for f in files)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cnnlab.tools.report import write_report

    path = write_report(args.run, args.out)
    print(f"report written to {path}")
    return 0
