"""Every bench script's --quick mode runs for real, on the built-in digits or small tensors, and its
results file holds what its table and the docs read: positive rates, ratios, machine and command.

The figures of a quick run mean nothing; the shape is what cannot be allowed to rot.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def run_quick(script: str, out: Path, *arguments: str) -> tuple[dict, str]:
    """Run `bench/<script> --quick`, writing its results to `out`; (the results, its stdout)."""
    command = [sys.executable, f"bench/{script}", "--quick", "--out", str(out), *arguments]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["torch"] == torch.__version__ and results["date"]
    assert script in results["command"] and "--quick" in results["command"]
    return results, finished.stdout


def test_kernels_times_each_compiled_kernel_against_torch_on_one_thread(tmp_path):
    results, stdout = run_quick("kernels.py", tmp_path / "kernels.json")

    rows = {row["kernel"]: row for row in results["kernels"]}
    assert set(rows) == {
        "pool1 + ReLU forward", "pool1 + ReLU backward", "conv1 + ReLU + pool1 forward",
        "conv1 + ReLU + pool1 backward", "batch preparation (gather + normalize)",
    }  # fmt: skip
    for row in rows.values():
        assert row["cnnlab_ms"] > 0 and row["torch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["cnnlab_ms"], rel=0.01)
        assert len(row["cnnlab_ms_each_round"]) == len(row["torch_ms_each_round"]) == results["rounds"]
    assert rows["pool1 + ReLU forward"]["shape"] == "192 x 6 x 24 x 24"
    assert results["threads"] == 1 and results["quick"]
    assert "| conv1 + ReLU + pool1 backward |" in stdout


def test_engines_compares_both_engines_as_users_get_them_and_writes_the_docs_section(tmp_path):
    docs = tmp_path / "backprop.md"
    docs.write_text("# Backprop\n\n## Speed\n\nHand-written prose.\n")
    results, stdout = run_quick("engines.py", tmp_path / "engines.json", "--dataset", "digits", "--docs", str(docs))

    rows = {row["engine"]: row for row in results["engines"]}
    assert list(rows) == ["autograd", "manual", "manual, fast=False"]
    assert all(row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["ratio_to_autograd"] > 0
               for row in rows.values())  # fmt: skip
    assert rows["autograd"]["ratio_to_autograd"] == 1.0
    assert results["ratio"] == rows["manual"]["ratio_to_autograd"]
    assert [row["options"]["fast"] for row in rows.values()] == [True, True, False]
    # Sliced as a user gets them: one slice per core, the same for all three.
    assert len({row["options"]["slices"] for row in rows.values()}) == 1
    assert results["batch_size"] == 256 and len(rows["manual"]["ratio_each_round"]) == results["rounds"]

    # No markers yet: the section goes at the end, the prose stays; a second run replaces it.
    text = docs.read_text()
    assert text.startswith("# Backprop\n\n## Speed\n\nHand-written prose.\n\n<!-- bench:engines:begin")
    assert text.rstrip().endswith("<!-- bench:engines:end -->") and "| hand-written, `fast=False` |" in text
    docs.write_text(text + "\nMore prose.\n")
    run_quick("engines.py", tmp_path / "engines.json", "--dataset", "digits", "--docs", str(docs))
    again = docs.read_text()
    assert again.count("<!-- bench:engines:begin") == 1 and again.endswith("\nMore prose.\n")
    assert "| autograd (`--engine autograd`) |" in stdout


def test_the_fast_path_ablation_times_every_variant_in_its_own_process_in_turns(tmp_path):
    results, stdout = run_quick("fastpath.py", tmp_path / "fastpath.json", "--dataset", "digits")

    [result] = results["results"]
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"eager", "fast path", "fast path, sliced", "one slice alone"}
    assert all(row["images_per_s"] > 0 and len(row["step_ms_each_round"]) == results["rounds"] for row in rows.values())
    assert rows["eager"]["speedup_vs_eager"] == 1.0 and rows["eager"]["options"] == {"fast": False, "slices": 1}
    assert rows["fast path, sliced"]["options"] == {"fast": True, "slices": None}
    # one core's share: the batch over the intra-op threads (the cores) the children start with
    assert rows["one slice alone"]["batch_size"] == 128 // torch.get_num_threads()
    assert rows["fast path, sliced"]["batch_size"] == 128
    assert result["sliced_over_one_slice_alone"] > 0
    assert "cores sliced = x" in stdout


def test_the_profile_finds_the_compiled_kernels_by_their_autograd_names(tmp_path):
    results, _ = run_quick("fastpath.py", tmp_path / "profile.json", "--dataset", "digits", "--profile",
                           "--batch-size", "128")  # fmt: skip

    shares = results["shares"]
    assert sum(shares.values()) == pytest.approx(1, abs=0.01)
    for group in ("conv1 + ReLU + pool1 forward (compiled)", "conv1 + ReLU + pool1 backward (compiled)",
                  "pool2 + ReLU forward (compiled)", "pool2 + ReLU backward (compiled)", "conv2 backward (oneDNN)"):
        assert shares.get(group, 0) > 0, group  # fmt: skip
    assert results["ms_per_step_profiled"] > 0 and results["threads"] == 1


def test_the_onednn_breakdown_finds_every_convolution_pass_and_the_reorders(tmp_path):
    result, stdout = run_quick("onednn_primitives.py", tmp_path / "onednn.json", "--dataset", "digits",
                               "--batch-size", "64")  # fmt: skip

    assert result["step_ms"] > 0 and result["batch_size"] == 64
    rows = result["rows"]
    convolutions = {row["what"].split(" ")[0] for row in rows if row["primitive"] == "convolution"}
    assert convolutions == {"forward_training", "backward_data", "backward_weights"}
    # LeNet-5's second convolution (6 -> 16 channels), on the slice of 64 images; the first runs
    # cnnlab's compiled loops, not oneDNN.
    assert any(row["primitive"] == "convolution" and row["problem"].startswith("mb64_ic6oc16") for row in rows)
    assert not any(row["problem"].startswith("mb64_ic1oc6") for row in rows)
    assert any(row["primitive"] == "reorder" and " -> " in row["what"] for row in rows)
    assert all(row["ms_per_step"] >= 0 for row in rows)
    assert result["onednn_ms_per_step"] == pytest.approx(sum(row["ms_per_step"] for row in rows), abs=1e-2)
    assert "| convolution |" in stdout


def test_augment_cost_times_epochs_with_and_without_augmentation(tmp_path):
    result, _ = run_quick("augment_cost.py", tmp_path / "augment.json", "--dataset", "digits")

    assert result["epoch_s_with"] > 0 and result["epoch_s_without"] > 0 and result["augment_s_per_epoch"] > 0
    assert 0 < result["share_direct"] < 1 and result["share_end_to_end"] < 1
    assert result["train_images"] > 0 and result["epochs_timed"] == 1


def test_the_folder_cache_is_read_back_faster_than_decoding(tmp_path):
    result, _ = run_quick("folder_cache.py", tmp_path / "folder.json")

    assert result["first_read_s"] > 0 and result["cached_read_s"] > 0 and result["cache_bytes"] > 0
    assert result["ratio"] == pytest.approx(result["first_read_s"] / result["cached_read_s"], rel=0.05)


def test_alternate_takes_turns_in_alternating_order_after_one_warm_up_each(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from harness import alternate

    calls = []
    work = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = alternate(work, rounds=3, calls={"a": 2, "b": 1})
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "a", "a", "b"]
    assert [len(s) for s in seconds.values()] == [3, 3] and all(t >= 0 for s in seconds.values() for t in s)


def test_precision_compares_cnnlab_and_plain_loops_in_fp32_and_bf16_per_model(tmp_path):
    results, stdout = run_quick("precision.py", tmp_path / "precision.json", "--dataset", "digits",
                                "--models", "simple_cnn,lenet5_bn")  # fmt: skip
    for model in ("simple_cnn", "lenet5_bn"):
        rows = results["models"][model]
        assert set(rows) == {f"{loop} {p}" for loop in ("cnnlab", "plain", "plain-cl") for p in ("fp32", "bf16")}
        assert rows["cnnlab fp32"]["speed_vs_cnnlab_fp32"] == 1.0
        for row in rows.values():
            assert row["images_per_s"] > 0 and row["speed_vs_cnnlab_fp32"] > 0
            assert 0 <= row["test_accuracy"] <= 1
    assert "lenet5_bn plain-cl bf16" in " ".join(stdout.split())


def test_compress_prunes_both_ways_and_quantizes_one_run(tmp_path):
    figures, stdout = run_quick("compress.py", tmp_path / "compress.json", "--channels-widths", "4,8,60,42",
                                "--work", str(tmp_path / "work"))  # fmt: skip
    assert figures["channels"]["after"]["widths"] == [4, 8, 60, 42]
    assert figures["global_magnitude"]["after"]["weight_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert set(figures["quantize"]["speedup"]) == {"1", "256"} and figures["quantize"]["int8_bytes"] > 0
    assert "prune channels: test" in stdout and "quantize int8: test" in stdout
