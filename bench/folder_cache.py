"""How much the decoded-image cache of `folder:` datasets saves.

Writes a folder of small random PNGs (10 classes), then reads it twice with
`read_image_folder`: the first read decodes every file and writes the cache,
the second finds the cache valid and loads it. Goal: the second read at least
20x faster. Writing the PNGs is not timed.

    python bench/folder_cache.py [--images 10000] [--size 32] [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.data.folder import FolderSpec, read_image_folder
from harness import bench_parser, results_path, write_results

GOAL_RATIO = 20.0
QUICK_IMAGES = 300


def write_pngs(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def measure(images: int = 10_000, size: int = 32, root: Path | None = None) -> dict:
    """Seconds for the first (decoding) and second (cached) read of a folder of `images` PNGs."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_pngs(folder, images, size)
        spec = FolderSpec.parse(f"folder:{folder}")
        started = time.perf_counter()
        first = read_image_folder(spec)
        decode_s = time.perf_counter() - started
        started = time.perf_counter()
        second = read_image_folder(spec)
        cached_s = time.perf_counter() - started
        assert torch.equal(first.train.images, second.train.images)
        cache_bytes = sum(p.stat().st_size for p in folder.glob(".cnnlab-cache-*"))
    return {
        "images": images,
        "image_size": [3, size, size],
        "first_read_s": round(decode_s, 4),
        "cached_read_s": round(cached_s, 4),
        "ratio": round(decode_s / cached_s, 1),
        "goal_ratio": GOAL_RATIO,
        "cache_bytes": cache_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0], dataset=False)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    result = measure(QUICK_IMAGES if args.quick else args.images, args.size)
    print(
        f"{result['images']} PNGs of {args.size}x{args.size}: first read {result['first_read_s']:.2f} s, "
        f"cached {result['cached_read_s']:.3f} s, {result['ratio']:.0f}x (goal {GOAL_RATIO:.0f}x)"
    )
    write_results(results_path("folder_cache", args.quick, args.out), {**result, "quick": args.quick})
    return 0 if args.quick or result["ratio"] >= GOAL_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
