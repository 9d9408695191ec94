"""How heavy a run's report.html is: its size, and how long Chromium takes to open it.

    python bench/report_page.py runs/NAME [--repeat 5]

Opens RUN/report.html in Debian's chromium (Playwright, headless) `--repeat` times, each in a fresh
page, and prints the file's size and the median time to the page's load event (every image decoded),
from the navigation's start.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from playwright.sync_api import sync_playwright

LOAD_MS = "() => performance.getEntriesByType('navigation')[0].loadEventEnd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    page_path = (args.run / "report.html").resolve()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        times = []
        for _ in range(args.repeat):
            page = browser.new_page()
            page.goto(page_path.as_uri(), wait_until="load")
            times.append(page.evaluate(LOAD_MS))
            page.close()
        browser.close()
    size = page_path.stat().st_size
    print(f"{page_path}: {size / 2**20:.2f} MiB, opens in {statistics.median(times):.0f} ms "
          f"(median of {args.repeat}; {min(times):.0f}-{max(times):.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
