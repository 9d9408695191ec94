"""Does pretraining pay on a small labelled set? LeNet-5 trained on Fashion-MNIST, fine-tuned on 50 digits a class.

For each seed, a folder dataset holds `--per-class` images of each digit, drawn
with that seed from the built-in digits' training split (28x28 grey), and the
digits' whole test split (359 images, the same for every seed). On it, with the
same options and the same seed, `cnnlab train` runs four ways (in this process,
each seeded from its --seed, as alone):

    scratch               from a random initialisation
    fine-tuned            --init-from the pretrained run: every layer trains, the head is new
    fine-tuned, head x10  the same at --lr 0.01 (a fifth), the new head at --head-lr-mult 10
    frozen features       --init-from the pretrained run --freeze features: only the Linear layers train

and the table gives each one's test accuracy over the seeds (mean, standard
deviation, lowest and highest). Every run's command line is in the results.

    python bench/transfer.py [--pretrained RUN] [--per-class 50] [--seeds 0 1 2] [--docs docs/transfer.md]

Without --pretrained it first trains LeNet-5 on Fashion-MNIST with cnnlab's
recipe. --quick pretrains one epoch on digits and fine-tunes one epoch on 3
images a class: it checks that the script runs, its figures mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cnnlab.cli import main as cnnlab_main
from cnnlab.data.digits import load_digits_splits
from harness import bench_parser, results_path, write_docs, write_results

# The same for every arm: the built-in digits' recipe's batch, rate and shifts (cnnlab.config.RECIPES)
# over 30 epochs rather than 15, as 500 images make few steps an epoch; and no validation split, so
# that the fine-tuning set is all the labelled data there is and the test set is looked at once,
# after the last epoch.
FINE_TUNE = ["--epochs", "30", "--batch-size", "32", "--lr", "0.05", "--translate", "0.1", "--val-fraction", "0"]
ARMS = {
    "scratch": [],
    "fine-tuned": ["--init-from", "{pretrained}"],
    # A fifth of the rate for the pretrained layers, and twice it for the new head.
    "fine-tuned, head x10": ["--init-from", "{pretrained}", "--lr", "0.01", "--head-lr-mult", "10"],
    "frozen features": ["--init-from", "{pretrained}", "--freeze", "features"],
}
PRETRAIN = ["--model", "lenet5", "--dataset", "fashion-mnist", "--seed", "0"]


def write_few_shot_folder(folder: Path, per_class: int, seed: int) -> None:
    """folder/train/<digit>/*.png: `per_class` training digits of each class drawn with `seed`;
    folder/test/<digit>/*.png: the digits' whole test split."""
    train, test = load_digits_splits()  # images (N, 1, 28, 28) uint8
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(train.classes)):
        members = torch.nonzero(train.labels == label).flatten()
        if len(members) < per_class:
            raise SystemExit(f"--per-class {per_class}: digits' training split has {len(members)} images of {label}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    for split, data in (("train", train.subset(torch.cat(chosen))), ("test", test)):
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            target = folder / split / data.classes[int(label)] / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(target)


def train(arguments: list[str], runs: Path, name: str) -> tuple[float, str]:
    """`cnnlab train ARGUMENTS` into runs/name, in this process: (its test accuracy, the command).

    Each run seeds everything from its --seed, so runs in one process repeat as they would alone.
    """
    arguments = [*arguments, "--runs-dir", str(runs), "--name", name]
    command = " ".join(["cnnlab train", *arguments])
    with contextlib.redirect_stdout(io.StringIO()):  # the epochs' lines; an error still goes to stderr
        status = cnnlab_main(["train", *arguments])
    if status != 0:
        raise SystemExit(f"{command} failed (its error is above)")
    return json.loads((runs / name / "summary.json").read_text())["test_accuracy"], command


def table(results: dict[str, list[float]], seeds: list[int], per_class: int) -> str:
    seed_list = ", ".join(map(str, seeds))
    lines = [
        f"| LeNet-5, {per_class} digits a class | test accuracy, mean ± std | lowest – highest "
        f"| seeds {seed_list} |",
        "|---|---|---|---|",
    ]
    for arm, accuracies in results.items():
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        each = ", ".join(f"{100 * a:.2f}" for a in accuracies)
        lines.append(
            f"| {arm} | {100 * statistics.mean(accuracies):.2f}% ± {100 * spread:.2f} | "
            f"{100 * min(accuracies):.2f} – {100 * max(accuracies):.2f}% | {each} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], dataset=False)
    parser.add_argument("--pretrained", help="a run directory to start from (default: pretrain one first)")
    parser.add_argument("--per-class", type=int, default=50, help="labelled training images per class; default 50")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--docs", type=Path, help="write the table into this Markdown file (e.g. docs/transfer.md)")
    args = parser.parse_args()
    started = time.time()
    fine_tune, pretrain, per_class, seeds = FINE_TUNE, PRETRAIN, args.per_class, args.seeds
    if args.quick:
        fine_tune = ["--epochs", "1", "--batch-size", "8", "--val-fraction", "0"]
        pretrain, per_class, seeds = ["--model", "lenet5", "--dataset", "digits", "--epochs", "1"], 3, seeds[:1]
    with tempfile.TemporaryDirectory(prefix="cnnlab-transfer-") as scratch:
        work = Path(scratch)
        pretrained, pretrain_command, pretrain_accuracy = args.pretrained, None, None
        if pretrained is None:
            pretrained = str(work / "runs" / "pretrained")
            pretrain_accuracy, pretrain_command = train(pretrain, work / "runs", "pretrained")
            print(f"pretrained: {100 * pretrain_accuracy:.2f}% test accuracy", flush=True)
        results: dict[str, list[float]] = {arm: [] for arm in ARMS}
        commands: list[str] = []
        for seed in seeds:
            data = work / f"digits-{per_class}-seed{seed}"
            write_few_shot_folder(data, per_class, seed)
            for arm, flags in ARMS.items():
                options = [arg.format(pretrained=pretrained) for arg in flags]
                name = f"{arm.replace(' ', '-')}-seed{seed}"
                arguments = ["--dataset", f"folder:{data}", "--seed", str(seed), *fine_tune, *options]
                accuracy, command = train(arguments, work / "runs", name)
                results[arm].append(accuracy)
                commands.append(command)
                print(f"seed {seed}, {arm}: {100 * accuracy:.2f}%", flush=True)
    text = table(results, seeds, per_class)
    print(text)
    figures = {
        "quick": args.quick,
        "per_class": per_class,
        "seeds": seeds,
        "fine_tune_options": fine_tune,
        "pretrained": args.pretrained or "trained by this script",
        "pretrain_command": pretrain_command,
        "pretrain_test_accuracy": pretrain_accuracy,
        "test_accuracy": results,
        "commands": commands,
    }
    write_results(results_path("transfer", args.quick, args.out), figures, started)
    if args.docs is not None:
        marker = f"transfer table, {per_class} a class"
        write_docs(args.docs, text, f"<!-- {marker}: generated by bench/transfer.py -->", f"<!-- end of {marker} -->")


if __name__ == "__main__":
    main()
