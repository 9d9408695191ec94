"""bench/recurrent.py --quick runs for real and writes what its table and the docs read."""

import pytest

from tests.bench.test_scripts import run_quick

pytestmark = pytest.mark.timeout(300)


def test_recurrent_times_both_engines_on_both_models_and_writes_the_docs_section(tmp_path):
    docs = tmp_path / "backprop.md"
    docs.write_text("# Backprop\n\n## Backpropagation through time\n\nHand-written prose.\n")
    results, stdout = run_quick("recurrent.py", tmp_path / "recurrent.json", "--dataset", "digits", "--docs", str(docs))

    rows = {(row["model"], row["engine"]): row for row in results["rows"]}
    assert list(rows) == [("rnn", "autograd"), ("rnn", "manual"), ("lstm", "autograd"), ("lstm", "manual")]
    assert all(row["images_per_s"] > 0 and row["ms_per_step"] > 0 for row in rows.values())
    assert rows[("lstm", "autograd")]["ratio_to_autograd"] == rows[("rnn", "autograd")]["ratio_to_autograd"] == 1.0
    ratio = rows[("lstm", "autograd")]["ms_per_step"] / rows[("lstm", "manual")]["ms_per_step"]
    assert rows[("lstm", "manual")]["ratio_to_autograd"] == pytest.approx(ratio, rel=0.5)  # a median of ratios
    assert results["slices"] >= 1 and results["quick"]
    text = docs.read_text()
    assert "Hand-written prose." in text and "| `lstm` | manual |" in text and "| `lstm` | manual |" in stdout
