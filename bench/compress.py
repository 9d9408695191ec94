"""Pruning, quantization and a tuning study of one trained run, through the cnnlab commands as a user runs them.

    (1) cnnlab prune RUN --method global-magnitude --amount 0.8
    (2) cnnlab prune RUN --method channels --amount 0.5 (or --widths W,...)
    (3) cnnlab quantize RUN
    (4) cnnlab tune (with --tune-trials N > 0): a study on both cores (--jobs 2)

Each prune and quantize command times the models it compares itself, in interleaved
rounds in its own process (cnnlab/tools/latency.py): their speed-ups are ratios taken
side by side. The tuning study reports its wall time and the share of trials its pruner
stopped.

    python bench/compress.py --run RUN [--steps 3] [--finetune-epochs 2] [--lr 0.01] [--channels-amount 0.5]
        [--channels-widths W,W,...]
        [--tune-trials 0] [--tune-epochs 3] [--tune-dataset D] [--tune-timeout S] [--work DIR] [--quick] [--out PATH]

Without --run, a LeNet-5 is trained first (digits with --quick). Results go to
bench/results/compress.json (a --quick run's to the temporary folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_parser, default_dataset, results_path, write_results


def cnnlab(*arguments: str, figures: Path | None = None) -> dict:
    """Run `python -m cnnlab ARGUMENTS --json`; its JSON answer, with the wall seconds it took.

    figures: the file where the command leaves its figures; when it is already there (a bench
    stopped part-way and run again with the same --work), the command is not run again.
    """
    if figures is not None and figures.is_file():
        return {**json.loads(figures.read_text()), "reused_from": str(figures)}
    started = time.perf_counter()
    command = [sys.executable, "-m", "cnnlab", *arguments, "--json"]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"cnnlab {' '.join(arguments)} failed:\n{finished.stderr[-3000:]}")
    return {**json.loads(finished.stdout), "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run; default: train a LeNet-5 first")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning's peak learning rate")
    parser.add_argument("--channels-amount", type=float, default=0.5)
    parser.add_argument("--channels-widths", help="the channel-pruned model's layer widths, instead of the amount")
    parser.add_argument("--tune-trials", type=int, default=0, help="trials of the tuning study; 0: no study")
    parser.add_argument("--tune-epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--tune-dataset", help="the study's dataset; default --dataset's")
    parser.add_argument("--tune-timeout", type=float, help="seconds after which the study starts no more trials")
    parser.add_argument("--work", type=Path, help="where the pruned runs, the int8 model and the study go (default: a "
                        "new temporary folder); figures already there are reused, so a stopped bench continues")  # fmt: skip
    args = parser.parse_args()
    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnlab-bench-compress-"))
    dataset = args.dataset or ("digits" if args.quick else default_dataset())
    steps, epochs = (1, 1) if args.quick else (args.steps, args.finetune_epochs)
    run = args.run
    if run is None:
        trained = cnnlab("train", "--dataset", dataset, "--epochs", "2" if args.quick else "10",
                         "--runs-dir", str(work), "--name", "base")  # fmt: skip
        run = Path(trained["run_dir"])
    figures: dict = {"run": str(run)}
    tuning = ["--steps", str(steps), "--finetune-epochs", str(epochs), "--lr", str(args.lr)]
    figures["global_magnitude"] = cnnlab("prune", str(run), "--amount", "0.8", *tuning, "--out", str(work / "global"),
                                         figures=work / "global" / "prune.json")  # fmt: skip
    narrowing = ["--widths", args.channels_widths] if args.channels_widths else ["--amount", str(args.channels_amount)]
    figures["channels"] = cnnlab("prune", str(run), "--method", "channels", *narrowing, *tuning,
                                 "--out", str(work / "channels"), figures=work / "channels" / "prune.json")  # fmt: skip
    figures["quantize"] = cnnlab("quantize", str(run), "--out", str(work / "model.int8.onnx"),
                                 figures=work / "model.int8.onnx.json")
    if args.tune_trials > 0:
        timeout = ["--timeout", str(args.tune_timeout)] if args.tune_timeout else []
        figures["tune"] = cnnlab("tune", "--dataset", args.tune_dataset or dataset, "--trials", str(args.tune_trials),
                                 "--epochs", str(args.tune_epochs), "--jobs", "2", "--runs-dir", str(work / "tune"),
                                 "--study", "bench", *timeout, figures=work / "tune" / "bench" / "tune.json")  # fmt: skip
        figures["tune"].pop("trials")  # each trial's row stays in the study's tune.json
    results = write_results(results_path("compress", args.quick, args.out), figures, started)
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for key, label in (("global_magnitude", "prune 80% of the weights"), ("channels", "prune channels")):
        f = results[key]
        lost = 100 * (f["before"]["test_accuracy"] - f["after"]["test_accuracy"])
        lines.append(f"{label}: test {100 * f['before']['test_accuracy']:.2f}% -> {100 * f['after']['test_accuracy']:.2f}% "
                     f"({lost:.2f} points lost), sparsity {100 * f['after']['weight_sparsity']:.1f}%, parameters "
                     f"{f['before']['parameters']:,} -> {f['after']['parameters']:,}, batch 256 x{f['speedup']['torch_ms']['256']:.2f} "
                     f"PyTorch, x{f['speedup']['onnxruntime_ms']['256']:.2f} ONNX Runtime")  # fmt: skip
    q = results["quantize"]
    lines.append(f"quantize int8: test {100 * q['fp32_test_accuracy']:.2f}% -> {100 * q['int8_test_accuracy']:.2f}%, "
                 f"batch 256 x{q['speedup']['256']:.2f}, batch 1 x{q['speedup']['1']:.2f} against fp32 ONNX Runtime "
                 f"({q['execution_provider']}; CPU: {', '.join(q['cpu_int8_features'])})")  # fmt: skip
    if "tune" in results:
        t = results["tune"]
        lines.append(f"tune: {t['finished_trials']} trials in {t['wall_seconds_this_run']:.0f} s, "
                     f"{100 * t['pruned_share']:.0f}% pruned; best validation {100 * t['best']['val_accuracy']:.2f}%, "
                     f"its test {100 * t['best']['test_accuracy']:.2f}%")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
