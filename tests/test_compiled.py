"""cnnlab's compiled loops are kept on disk: a second process loads their machine code instead of compiling."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One training step of LeNet-5 with flips and crops on a CPU's fast path: every compiled loop
# cnnlab has (normalization, crop and flip, max-pool, the first convolution) runs.
STEP = """
import torch
from cnnlab.config import TrainConfig, AugmentConfig
from cnnlab.models import create_model
from cnnlab.engine import make_engine
from cnnlab.train.loop import make_augmenter
from cnnlab.data.dataset import Normalization
config = TrainConfig(batch_size=256, augment=AugmentConfig(crop_padding=2, flip=True))
engine = make_engine(create_model("lenet5", (1, 28, 28), 10), config)
images = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8)
x = make_augmenter(config, torch.device("cpu"))(Normalization((0.5,), (0.5,)).apply(images, torch.arange(256)))
engine.train_step(x, torch.arange(256) % 10, 0.01)
"""


def test_a_second_process_loads_every_compiled_loop_from_the_disk_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}

    def run() -> str:
        finished = subprocess.run([sys.executable, "-c", STEP], cwd=ROOT, env=env, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-3000:]
        return finished.stdout

    first, second = run(), run()
    compiled = set(re.findall(r"data saved to '.*?([\w.]+)-\d+\.py", first))
    loaded = set(re.findall(r"data loaded from '.*?([\w.]+)-\d+\.py", second))
    assert "data saved" not in second  # nothing compiled again
    # The loops called from Python are loaded; a loop called only from other compiled loops (the
    # first convolution's _split and _read) is part of their machine code.
    assert loaded == compiled - {"conv_pool._split", "conv_pool._read"}
    assert {"conv_pool._forward_kernel.locals.forward", "conv_pool._weight_grad_kernel.locals.weight_grad"} <= loaded
