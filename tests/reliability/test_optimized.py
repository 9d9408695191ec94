"""The readers of untrusted bytes behave the same under `python -O`, which strips `assert` statements.

A check written as an assert would vanish there and let a bad file through to a crash;
cnnlab's checks are explicit. This runs a selection of the fuzz tests in a `python -O`
process. pytest's own assertions go with -O too, so what is checked there is what matters
most: every input loads or raises CnnlabError, nothing else.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READER_TESTS = "idx_reader or random_bytes_as_a_cifar or damaged_cifar_archives or decode_image or yaml or checkpoints"

pytestmark = pytest.mark.timeout(300)


def test_the_reader_fuzz_tests_pass_under_python_O(tmp_path):
    env = {**os.environ, "CNNLAB_FUZZ_EXAMPLES": "40"}
    # `python -O -m pytest`, with proof that -O took effect: `assert False` would stop the process otherwise.
    command = [sys.executable, "-O", "-c", "import sys; assert False; import pytest; sys.exit(pytest.main(sys.argv[1:]))"]
    command += ["-q", "-p", "no:cacheprovider", "tests/data/test_fuzz.py", "-k", READER_TESTS]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = finished.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 7, summary
