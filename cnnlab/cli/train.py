"""`cnnlab train`: its flags, how they resolve into a TrainConfig, and a new or resumed run."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.cli.common import print_json
from cnnlab.config import (
    ENGINES,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    Resolution,
    TrainConfig,
    load_yaml_config,
    resolve,
)
from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.train.checkpoint import Checkpoint

# Train flags and where each lands in TrainConfig ("optim.lr" is config.optim.lr).
TRAIN_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"help": "model name (see `cnnlab models`); default lenet5"}),
    ("--dataset", "dataset", {"help": "dataset name or folder:PATH (see `cnnlab datasets`); default digits"}),
    ("--data-dir", "data_dir", {"help": "folder holding dataset sub-folders (else $CNNLAB_DATA)"}),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--lr", "optim.lr", {"type": float, "help": "peak learning rate"}),
    ("--optimizer", "optim.name", {"choices": OPTIMIZERS}),
    ("--momentum", "optim.momentum", {"type": float}),
    ("--nesterov", "optim.nesterov", {"action": argparse.BooleanOptionalAction}),
    ("--weight-decay", "optim.weight_decay", {"type": float, "help": "L2 on every parameter: coupled for sgd and "
                                               "adam (added to the gradient), decoupled for adamw (the weights shrink "
                                               "by lr * decay beside the step); default 5e-4"}),
    ("--schedule", "optim.schedule", {"choices": SCHEDULES}),
    ("--step-size", "optim.step_size", {"type": int, "help": "epochs between decays (step schedule)"}),
    ("--gamma", "optim.gamma", {"type": float, "help": "decay factor (step schedule)"}),
    ("--warmup", "optim.warmup_fraction", {"type": float, "help": "one-cycle: share of the steps spent "
                                            "warming up to the peak rate; default 0.25"}),
    ("--grad-clip", "optim.grad_clip", {"type": float, "help": "max gradient norm; 0 = off"}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--loss", "loss", {"choices": LOSSES, "help": "cross-entropy, or mse: mean squared error between the logits "
                        "and one-hot targets; default cross-entropy"}),
    ("--dropout", "dropout", {"type": float, "help": "dropout probability before the classifier's fc layers, "
                              "in [0, 1); default 0 (none)"}),
    ("--l1", "l1", {"type": float, "metavar": "LAMBDA", "help": "add LAMBDA * sum|w| over conv and fc weights to "
                    "the loss; metrics.csv reports it per epoch; default 0 (off)"}),
    ("--patience", "patience", {"type": int, "metavar": "N", "help": "stop after N epochs without a better "
                                "validation accuracy (and test the best epoch); default 0 (off)"}),
    ("--min-delta", "min_delta", {"type": float, "metavar": "D", "help": "early stopping: a validation accuracy "
                                  "gain of more than D counts as better; default 0"}),
    ("--precision", "precision", {"choices": PRECISIONS, "help": "fp32; bf16 (CPU or CUDA) or fp16 (CUDA) autocast, "
                                  "autograd engine only; default fp32"}),
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
    ("--sync-bn", "sync_bn", {"action": "store_true", "help": "data-parallel (--nproc, torchrun): batch-norm "
                               "statistics over the whole global batch rather than each process's shard"}),
    ("--strict", "strict_data", {"action": "store_true", "help": "folder: datasets: fail on unreadable images"}),
    ("--tensorboard", "tensorboard", {"action": "store_true", "help": "also log each epoch's metrics and layer "
                                      "diagnostics to RUN/tensorboard (the tensorboard extra)"}),
    # Transfer learning and parameter groups (docs/transfer.md)
    ("--init-from", "init_from", {"metavar": "RUN", "help": "start from the weights of a run directory, checkpoint "
                                  "(.pt) or exported .safetensors; the head is replaced when the classes differ"}),
    ("--freeze", "freeze", {"metavar": "LAYERS", "help": "with --init-from: keep these layers fixed, comma-separated: "
                            "features (the layers before the first Linear) and/or layer names such as 0,3"}),
    ("--head-lr-mult", "optim.head_lr_mult", {"type": float, "metavar": "K", "help": "the head's (last Linear "
                                              "layer's) learning rate, as a multiple of --lr; default 1"}),
    ("--bias-decay", "optim.bias_decay", {"action": argparse.BooleanOptionalAction, "help": "apply --weight-decay to "
                                          "biases and batch-norm weights too (default); --no-bias-decay: only to "
                                          "conv and linear weights"}),
]



def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model into a run directory",
        description="Train a model into a run directory. Options resolve in layers: the defaults, then cnnlab's "
        "tuned recipe for the model and dataset (if it has one), then --config, then flags.",
    )
    train.add_argument("--config", type=Path, help="YAML file of options; flags override it")
    for flag, dest, options in TRAIN_FLAGS:
        train.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)
    train.add_argument(
        "--no-recipe", action="store_true", help="the plain defaults, without cnnlab's tuned recipe for the model and dataset"
    )
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this directory")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    train.add_argument("--json", action="store_true", help="print one JSON object with the results")
    train.set_defaults(handler=_train)
    _add_launcher(train)



def _train(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _launch(args)
    from cnnlab.train.distributed import join
    from cnnlab.train.loop import fit
    from cnnlab.train.progress import Progress

    world = join()  # one process, or this one's rank in a torchrun job
    progress = Progress(stream=sys.stderr if args.json else sys.stdout)
    if args.resume is not None:
        run = world.open_run(args.resume)
        checkpoint = run.resume_checkpoint  # last.pt, or the newest good one if it is damaged
        config = world.agree(lambda: _resumed_config(args, checkpoint, run_path=run.path))
        result = fit(config, run, progress, resume=checkpoint, world=world)
    else:
        resolution = world.agree(lambda: _resolve_new_run(args))
        config = dataclasses.replace(resolution.config, world_size=world.size)
        if resolution.recipe_applied or resolution.recipe_overridden:
            progress.message(_recipe_line(resolution))
        run = world.create_run(Path(config.runs_dir) / (config.name or _run_name(config)), overwrite=args.overwrite)
        if run.resume_checkpoint is not None:  # torchrun restarted the job after a failure
            progress.message(f"the job restarted: {run.path} continues from epoch {run.resume_checkpoint.epoch}")
        result = fit(config, run, progress, resume=run.resume_checkpoint, world=world)

    if world.rank == 0:  # the one that writes the run
        _write_report(result.run_dir)
    test = result.test.evaluation
    if args.json:
        print_json({"run_dir": str(result.run_dir), "test_accuracy": test.accuracy, "test_loss": test.loss, "epochs": result.rows})
    else:
        print(f"test loss {test.loss:.4f}  test accuracy {100 * test.accuracy:.2f}%")
        print(f"run saved in {result.run_dir}")
    return 0


def _write_report(run_dir: Path) -> None:
    """report.html for the finished run. The run is saved already: a failure here is a warning, not its end."""
    try:
        from cnnlab.tools.report import write_report

        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the run and its results stay
        warnings.warn(f"the run is saved, but its report.html was not written ({exc}); try `cnnlab report {run_dir}`")


def _resolve_new_run(args: argparse.Namespace) -> Resolution:
    """The defaults, the recipe (unless --no-recipe), --config and the flags, resolved and validated."""
    file_options = load_yaml_config(args.config) if args.config else {}
    # Flags are typed by argparse and recipes are cnnlab's own, so a mistake can only be the file's.
    origin = str(args.config) if args.config else "config"
    return resolve(file_options, flag_options(args), origin=origin, recipe=not args.no_recipe)


def _resumed_config(args: argparse.Namespace, checkpoint: Checkpoint, *, run_path: Path) -> TrainConfig:
    """The run's saved config, with the only flags a resumed run may change (--epochs, --device)."""
    flags = flag_options(args)
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



def flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The train flags given on the command line, nested as in a config file: {"optim": {"lr": 0.1}}."""
    options: dict[str, Any] = {}
    for _, dest, _ in TRAIN_FLAGS:
        if hasattr(args, dest):
            section, _, field = dest.rpartition(".")
            (options.setdefault(section, {}) if section else options)[field] = getattr(args, dest)
    return options


# --nproc N: the same command as a torchrun job of N processes on this machine
# (cnnlab.train.distributed; docs/distributed.md). Each process runs `cnnlab train`
# without --nproc, so what it trains is what the flags say, as on one process.


def _add_launcher(train: argparse.ArgumentParser) -> None:
    train.add_argument(
        "--nproc", type=int, metavar="N", help="train data-parallel with N processes on this machine, one per CPU "
        "core or GPU (runs torchrun; for several machines run torchrun yourself: docs/distributed.md)",
    )  # fmt: skip
    train.set_defaults(train_parser=train)


def _launch(args: argparse.Namespace) -> int:
    """Refuse what the ranks would refuse before any starts; else run them and return the job's exit status."""
    from cnnlab.train import distributed
    from cnnlab.train.loop import resolve_device
    from cnnlab.train.rundir import RunDirectory

    if args.nproc < 1:
        raise CnnlabError(f"--nproc must be at least 1, got {args.nproc}")
    if args.resume is not None:
        run = RunDirectory.open(args.resume)
        config = _resumed_config(args, run.resume_checkpoint, run_path=run.path)
    else:
        config = dataclasses.replace(_resolve_new_run(args).config, world_size=args.nproc)
    problem = distributed.launch_problem(config, args.nproc, args.nproc, resolve_device(config.device))
    if problem is not None:
        raise CnnlabError(problem)
    return distributed.launch(args.nproc, _rank_argv(args))


def _rank_argv(args: argparse.Namespace) -> list[str]:
    """The `train ...` arguments given, but --nproc, rebuilt from the parser's own options."""
    argv = ["train"]
    for action in args.train_parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv
