"""Property-based runs against the server: no request it can be sent makes it fail (5xx).

- schemathesis generates requests for every operation of /openapi.json (valid and
  invalid parameters, bodies of every declared media type) against a real uvicorn;
- hypothesis generates malformed images for the upload path: truncated PNG, JPEG,
  GIF, BMP, WebP and TIFF files, headers declaring gigantic sizes, zero bytes, random
  bytes, images under a content type that is not an image. Each is refused with a
  4xx and a JSON reason; corrupted (bit-flipped) images are either answered or
  refused, never a 5xx.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.tools.serve.app import create_app
from tests.tools.serve.conftest import FakeBackend, serving, wait_until
from tests.tools.serve.test_server import running

SCHEMA = schemathesis.openapi.from_dict(create_app(FakeBackend()).openapi())  # the same for every model
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
TAIL = 24  # bytes a PNG (IEND and its CRC) or GIF may lose at its end and still decode
REFUSALS = {413: ("too_large", "too_many_pixels"), 415: ("not_an_image",), 422: ("bad_request",)}


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = {fmt: _encoded(fmt) for fmt in FORMATS}


def huge_png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + chunk + IMAGES["PNG"][33:]  # the real pixel data after the forged header


def huge_jpeg(width: int, height: int) -> bytes:
    data = bytearray(IMAGES["JPEG"])
    sof = data.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def huge_gif(width: int, height: int) -> bytes:
    data = bytearray(IMAGES["GIF"])
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def huge_bmp(width: int, height: int) -> bytes:
    data = bytearray(IMAGES["BMP"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


big_side = st.integers(min_value=6400, max_value=65535)  # any two make more than the 40-megapixel limit
truncated = st.sampled_from(FORMATS).flatmap(
    lambda fmt: st.integers(0, len(IMAGES[fmt]) - TAIL).map(lambda cut: IMAGES[fmt][:cut]))  # fmt: skip
gigantic = st.tuples(st.sampled_from([huge_png, huge_jpeg, huge_gif, huge_bmp]), big_side, big_side).map(
    lambda t: t[0](t[1], t[2]))  # fmt: skip
garbage = st.binary(max_size=2048).filter(lambda b: not any(b.startswith(IMAGES[f][:4]) for f in FORMATS))


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    data = bytearray(IMAGES[draw(st.sampled_from(FORMATS))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def client(torch_backend) -> Iterator:
    with serving(torch_backend, max_batch=8) as client:
        yield client


def post(client, body: bytes, content_type: str, multipart: bool) -> httpx.Response:
    if multipart:
        return client.post("/v1/predict", files=[("file", ("upload", body, content_type))])
    return client.post("/v1/predict", content=body, headers={"Content-Type": content_type})


def assert_refused(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.json()["reason"] in REFUSALS[response.status_code] and response.json()["error"]


FUZZ = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(body=truncated, multipart=st.booleans())
def test_a_truncated_image_is_415(client, body, multipart):
    assert_refused(post(client, body, "image/png", multipart), 415)


@FUZZ
@given(body=gigantic, multipart=st.booleans())
def test_a_header_declaring_a_gigantic_image_is_413_before_decoding(client, body, multipart):
    response = post(client, body, "image/png", multipart)
    assert_refused(response, 413)
    assert response.json()["reason"] == "too_many_pixels"


@FUZZ
@given(body=garbage, multipart=st.booleans())
def test_bytes_that_are_no_image_are_415(client, body, multipart):
    assert_refused(post(client, body, "image/jpeg", multipart), 415)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), content_type=st.sampled_from(["text/plain", "application/json", "", "video/mp4",
                                                                   "multipart/mixed", "application/x-www-form-urlencoded"]))  # fmt: skip
def test_an_image_under_a_content_type_that_is_not_an_image_is_refused(client, fmt, content_type):
    assert_refused(client.post("/v1/predict", content=IMAGES[fmt], headers={"Content-Type": content_type}), 415)


@FUZZ
@given(body=corrupted(), multipart=st.booleans())
def test_a_corrupted_image_is_answered_or_refused_never_a_server_error(client, body, multipart):
    response = post(client, body, "image/png", multipart)
    if response.status_code != 200:
        assert_refused(response, 413, 415, 422)
    else:
        assert len(response.json()["predictions"]) == 1


def test_a_zero_byte_body_is_415(client):
    for multipart in (False, True):
        assert_refused(post(client, b"", "image/png", multipart), 415)
    assert client.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def server_url(torch_backend) -> Iterator[str]:
    with running(torch_backend, max_batch=8) as (url, _):
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
        yield url


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_api_describes_is_a_server_error(case, server_url):
    response = case.call(base_url=server_url, timeout=20)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code in REFUSALS and case.path == "/v1/predict":  # not 404 or 405: the router's own answers
        assert response.json()["reason"] in REFUSALS[response.status_code], response.text
