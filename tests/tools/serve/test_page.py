"""The page at `/` in a real browser (Debian's chromium through Playwright) against a real uvicorn server:
it describes the model, classifies a drawn digit and an uploaded image, and shows the API's refusals."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.tools.serve.conftest import wait_until
from tests.tools.serve.test_server import running

if TYPE_CHECKING:
    from playwright.sync_api import Page

PERCENT = re.compile(r"^\d{1,3}\.\d%$")
# Chromium hides a fetch's Blob bodies from Playwright, so this script, added to the page, keeps the last file sent.
KEEP_SENT = """{
  const fetch = window.fetch;
  window.fetch = (url, init) => {
    if (init && init.body instanceof FormData) window.sent = init.body.get("file");
    return fetch(url, init);
  };
}"""
SENT_BYTES = "async () => Array.from(new Uint8Array(await window.sent.arrayBuffer()))"


@pytest.fixture(scope="module")
def server_url(onnx_backend) -> Iterator[str]:
    """`cnnlab serve`'s app on uvicorn on a free port of 127.0.0.1, warm; stopped (bounded) after the module."""
    with running(onnx_backend) as (url, _):
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
        yield url


@dataclass
class Visit:
    """An open page and what went wrong while it ran: console errors, failed requests, error statuses."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "STATUS URL" of every answer >= 400
    foreign: list[str] = field(default_factory=list)  # requests that left the server (the page must work offline)


@pytest.fixture
def visit(chromium, server_url) -> Iterator[Visit]:
    """The page at `/`, opened at phone width, with the model's description shown."""
    context = chromium.new_context(viewport={"width": 390, "height": 844}, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    seen = Visit(page)
    page.on("console", lambda m: m.type == "error" and seen.console_errors.append(m.text))
    page.on("pageerror", lambda exc: seen.console_errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda r: seen.failed.append(f"{r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and seen.refused.append(f"{r.status} {r.url}"))
    page.on("request", lambda r: r.url.startswith((server_url, "data:", "blob:")) or seen.foreign.append(r.url))
    page.add_init_script(KEEP_SENT)
    try:
        page.goto(f"{server_url}/")
        page.locator("#about").get_by_text("test accuracy").wait_for()
        yield seen
    finally:
        context.close()


def shown_bars(page: Page) -> list[tuple[str, float, str]]:
    """The prediction's bars once shown: (class, probability, percentage text), top first."""
    page.locator("#bars li").first.wait_for()
    rows = page.locator("#bars li")
    return [(rows.nth(i).locator(".name").inner_text(), float(rows.nth(i).get_attribute("data-probability")),
             rows.nth(i).locator(".pct").inner_text()) for i in range(rows.count())]  # fmt: skip


def assert_a_prediction(bars: list[tuple[str, float, str]], classes: list[str]) -> None:
    assert bars and all(name in classes for name, _, _ in bars)
    assert [p for _, p, _ in bars] == sorted((p for _, p, _ in bars), reverse=True)
    assert sum(p for _, p, _ in bars) <= 1 + 1e-6
    for _, p, text in bars:
        assert PERCENT.match(text) and text == f"{100 * p:.1f}%"


def assert_clean(visit: Visit) -> None:
    assert visit.console_errors == [] and visit.failed == [] and visit.refused == [] and visit.foreign == []


def test_the_page_describes_the_model_at_phone_width(visit, server_url):
    model = httpx.get(f"{server_url}/v1/model").json()
    page = visit.page
    assert page.locator("h1").inner_text() == "lenet5"
    about = page.locator("#about").inner_text()
    assert "digits" in about and ", ".join(model["classes"]) in about
    assert f"{100 * model['test_accuracy']:.1f}%" in about
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    assert page.get_by_role("button", name="Clear").is_visible()
    assert page.get_by_label("Or drop an image here, or choose a file").count() == 1
    assert page.get_by_role("img", name="Drawing area").is_visible()
    assert "default-src 'self'" in httpx.get(f"{server_url}/").headers["content-security-policy"]
    assert_clean(visit)


@pytest.mark.parametrize(
    "seven",
    [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)], [(0.05, 0.06), (0.33, 0.06), (0.17, 0.4)]],
    ids=["large-centred", "small-in-a-corner"],
)  # one stroke, as fractions of the drawing area
def test_a_drawn_digit_is_classified_as_the_api_answers(visit, server_url, seven):
    page = visit.page
    pad = page.locator("#pad").bounding_box()
    corners = [(pad["x"] + pad["width"] * x, pad["y"] + pad["height"] * y) for x, y in seven]
    with page.expect_response("**/v1/predict?top_k=*") as answered:
        page.mouse.move(*corners[0])
        page.mouse.down()
        for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
            for t in (0.2, 0.4, 0.6, 0.8, 1.0):
                page.mouse.move(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
        page.mouse.up()
    assert "multipart/form-data" in answered.value.request.headers["content-type"]
    answer = answered.value.json()["predictions"][0]
    sent = bytes(page.evaluate(SENT_BYTES))
    image = Image.open(io.BytesIO(sent))
    assert image.format == "PNG" and image.width > 280 and image.height > 280  # as drawn: the server frames it
    pixels = np.asarray(image.convert("L"))
    assert pixels[0, 0] == 0 and pixels.max() > 200  # white on black, as the digits are
    bars = shown_bars(page)
    assert [(name, p) for name, p, _ in bars] == list(zip(answer["classes"], answer["probabilities"]))
    assert_a_prediction(bars, [str(d) for d in range(10)])
    assert "7" in [name for name, _, _ in bars[:3]]
    assert page.locator("#status").inner_text() == "Prediction for your drawing:"
    assert page.locator("#error").is_hidden()
    assert_clean(visit)

    page.get_by_role("button", name="Clear").click()
    assert page.locator("#bars li").count() == 0


def test_an_uploaded_image_is_classified(visit, digit_files):
    page = visit.page
    page.get_by_label("Or drop an image here, or choose a file").set_input_files(digit_files[0])
    bars = shown_bars(page)
    assert_a_prediction(bars, [str(d) for d in range(10)])
    assert page.locator("#status").inner_text() == f"Prediction for {digit_files[0].name}:"
    assert page.locator("#preview").is_visible()
    assert_clean(visit)


def test_a_non_image_upload_shows_the_apis_error(visit, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    page = visit.page
    page.get_by_label("Or drop an image here, or choose a file").set_input_files(notes)
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "cannot read image upload: not a PNG, JPEG" in alert.inner_text()
    assert "not_an_image" in alert.inner_text() and "415" in alert.inner_text()
    assert page.locator("#bars li").count() == 0
    assert page.locator("#status").inner_text() == "No prediction for notes.txt."
    assert [r.split()[0] for r in visit.refused] == ["415"]
    assert all("415" in message for message in visit.console_errors)  # Chromium logs every error status
    assert visit.failed == [] and visit.foreign == []
