"""tune, prune and quantize: search for a better configuration, and make a trained model smaller and faster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab.cli.common import needs_extra, print_json
from cnnlab.cli.train import TRAIN_FLAGS, flag_options
from cnnlab.config import load_yaml_config


def add_commands(commands: argparse._SubParsersAction) -> None:
    """tune, prune and quantize."""
    tune = commands.add_parser(
        "tune",
        help="search hyper-parameters with Optuna, choosing on validation accuracy",
        description="Search train options with Optuna. Train flags given here (and --config) are fixed for every "
        "trial; the space file says what varies. Each trial is a run under RUNS/STUDY/; the best one alone is "
        "tested, and its config written to RUNS/STUDY/best.yaml for `cnnlab train --config`. Running the same "
        "command again continues the study.",
    )
    tune.add_argument("--trials", type=int, default=20, help="finished trials the study should hold; default 20")
    tune.add_argument("--sampler", default="tpe", help="tpe (default), random or grid")
    tune.add_argument("--pruner", default="median", help="median (default), halving (successive halving) or none")
    tune.add_argument("--space", type=Path, help="YAML search space (see docs/compression.md); default: the model's")
    tune.add_argument("--study", help="study name; default MODEL-DATASET")
    tune.add_argument("--storage", help="Optuna storage URL; default sqlite:///RUNS/STUDY/study.db")
    tune.add_argument("--jobs", type=int, default=1, help="worker processes sharing the study; default 1")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument("--config", type=Path, help="YAML file of fixed train options; flags override it")
    for flag, dest, options in TRAIN_FLAGS:
        if dest != "name":
            tune.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)
    tune.add_argument("--no-recipe", action="store_true", help="start from the plain defaults, not the tuned recipe")
    tune.add_argument("--json", action="store_true", help="print one JSON object with the results")
    tune.set_defaults(handler=_tune)

    prune = commands.add_parser(
        "prune",
        help="prune a trained run (weights or whole channels), fine-tuning between steps, into a new run",
        description="Prune RUN's best model in --steps steps with fine-tuning after each, into a new run that "
        "evaluate, predict, export and serve take; print parameters, non-zeros, ONNX size, test accuracy and "
        "latency (PyTorch, ONNX Runtime; batch 1 and 256) before and after.",
    )
    prune.add_argument("run", type=Path, metavar="RUN", help="a run directory (its best checkpoint) or a .pt file")
    prune.add_argument("--amount", type=float, help="share removed, in (0, 1): 0.8 removes 80%%")
    prune.add_argument("--widths", type=_widths, metavar="W,W,...", help="with --method channels, instead of "
                       "--amount: each layer's width at the end, e.g. 4,8,120,84 for lenet5 (6,16,120,84)")  # fmt: skip
    prune.add_argument("--method", default="global-magnitude",
                       help="global-magnitude (default: zero the smallest weights) or channels (a smaller model)")  # fmt: skip
    prune.add_argument("--steps", type=int, default=3, help="prune-then-fine-tune rounds; default 3")
    prune.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after each step; default 2")
    prune.add_argument("--lr", type=float, default=0.01, help="fine-tuning's peak learning rate; default 0.01")
    prune.add_argument("--out", type=Path, help="the new run's directory; default RUN-METHOD-PERCENT beside RUN")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    prune.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    prune.set_defaults(handler=_prune)

    quantize = commands.add_parser(
        "quantize",
        help="int8 ONNX model (static quantization), tested and timed against fp32 in ONNX Runtime",
        description="Quantize a run's model (or an exported model.onnx) to int8 with ONNX Runtime's static "
        "quantization, calibrated on training images; test it and time it against the fp32 graph.",
    )
    quantize.add_argument("model", type=Path, metavar="RUN|MODEL.onnx")
    quantize.add_argument("--calibration-images", type=int, default=512, help="training images; default 512")
    quantize.add_argument("--data-dir", type=Path, help="where the dataset is (default: the run's, else the usual)")
    quantize.add_argument("--out", type=Path, help="the int8 model; default RUN/export/model.int8.onnx or MODEL.int8.onnx")
    quantize.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    quantize.set_defaults(handler=_quantize)


def _tune(args: argparse.Namespace) -> int:
    with needs_extra("tune", "tune"):
        from cnnlab.config import resolve_config
        from cnnlab.tools.space import default_space, load_space
        from cnnlab.tools.tune import TuneSettings, summary_table, tune
        from cnnlab.train.progress import Progress

        fixed = (load_yaml_config(args.config) if args.config else {}, flag_options(args))
        model = resolve_config(*fixed, origin=str(args.config or "tune options"), recipe=not args.no_recipe).model
        space = load_space(args.space) if args.space else default_space(model)
        settings = TuneSettings(
            fixed=fixed, space=tuple(space), trials=args.trials, sampler=args.sampler, pruner=args.pruner,
            study=args.study, storage=args.storage, jobs=args.jobs, timeout=args.timeout, recipe=not args.no_recipe,
        )  # fmt: skip
        result = tune(settings, Progress(stream=sys.stderr if args.json else sys.stdout, bar=False))
    summary = result.summary
    if args.json:
        print_json({"study_dir": str(result.study_dir), "best_config": str(result.best_config), **summary})
        return 0
    best = summary["best"]
    print(summary_table(summary))
    print(f"{summary['finished_trials']} trials finished, {summary['pruned_trials']} pruned "
          f"({100 * summary['pruned_share']:.0f}%), {summary['wall_seconds_this_run']:.0f} s in this run")  # fmt: skip
    print(f"best: trial {best['number']}, validation accuracy {100 * best['val_accuracy']:.2f}%, "
          f"test accuracy {100 * best['test_accuracy']:.2f}% ({best['run_dir']})")  # fmt: skip
    print(f"its config: {result.best_config} (cnnlab train --config {result.best_config}); plots in {result.study_dir}")
    return 0


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None


def _prune(args: argparse.Namespace) -> int:
    with needs_extra("prune", "export"):
        from cnnlab.tools.compare import table
        from cnnlab.tools.prune import PruneSettings, prune_run
        from cnnlab.train.progress import Progress

        settings = PruneSettings(amount=args.amount, method=args.method, widths=args.widths, steps=args.steps,
                                 finetune_epochs=args.finetune_epochs, lr=args.lr)  # fmt: skip
        progress = Progress(stream=sys.stderr if args.json else sys.stdout, bar=False)
        run, figures = prune_run(args.run, settings, args.out, args.overwrite, progress)
    if args.json:
        print_json({"run_dir": str(run.path), **figures})
        return 0
    print(table(figures))
    print(f"pruned run saved in {run.path} (figures in prune.json)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    with needs_extra("quantize", "export"):
        from cnnlab.tools.quantize import quantize

        figures = quantize(args.model, args.data_dir, args.out, args.calibration_images)
    if args.json:
        print_json(figures)
        return 0
    print(f"{'':<22} {'fp32':>10} {'int8':>10}")
    print(f"{'test accuracy':<22} {100 * figures['fp32_test_accuracy']:9.2f}% {100 * figures['int8_test_accuracy']:9.2f}%")
    print(f"{'file size':<22} {figures['fp32_bytes']:>10,} {figures['int8_bytes']:>10,}")
    for batch, speed in figures["speedup"].items():
        print(f"{f'latency batch {batch}':<22} {figures['fp32_ms'][batch]:8.3f}ms {figures['int8_ms'][batch]:8.3f}ms  x{speed:.2f}")
    print(f"top-1 agreement {100 * figures['top1_agreement']:.2f}%, max |logit diff| {figures['max_abs_logit_diff']:.3f}")
    features = ", ".join(figures["cpu_int8_features"]) or "none that ONNX Runtime's int8 kernels use"
    print(f"ONNX Runtime {figures['onnxruntime']}, {figures['execution_provider']}; this CPU's int8 features: {features}")
    print(f"int8 model: {figures['model']} (figures in {figures['model']}.json)")
    return 0
