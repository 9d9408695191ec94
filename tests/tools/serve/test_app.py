"""The HTTP routes through TestClient: answers, their JSON, every refusal, metrics, the log, readiness."""

from __future__ import annotations

import json
import struct
import threading
import zlib

import pytest
import torch

from cnnlab.data.sources import load_splits
from cnnlab.tools.predict import Predictor
from cnnlab.tools.serve.app import INLINE_PIXELS
from tests.data.test_preprocess import png, users_picture
from tests.tools.serve.conftest import FakeBackend, metric, png_bytes, serving, wait_until

BOMB = (  # a PNG header claiming 8000 x 8000 pixels, and no pixel data
    b"\x89PNG\r\n\x1a\n"
    + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)
    + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)))
    + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
)  # fmt: skip
FAKE_PNG = png_bytes(torch.full((1, 8, 8), 128, dtype=torch.uint8))


def multipart(paths) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_torch_backend_answers_exactly_as_cnnlab_predict(trained_run, torch_backend, digit_files):
    expected = Predictor.load(trained_run).predict_files(digit_files, top_k=3)
    with serving(torch_backend) as client:
        response = client.post("/v1/predict", files=multipart(digit_files))
    assert response.status_code == 200
    assert response.json() == {"model": "lenet5", "predictions": [p.to_dict() for p in expected]}


def test_onnx_backend_answers_as_cnnlab_predict_within_1e_4(trained_run, onnx_backend, digit_files):
    expected = Predictor.load(trained_run).predict_files(digit_files, top_k=10)
    with serving(onnx_backend) as client:
        got = client.post("/v1/predict?top_k=10", files=multipart(digit_files)).json()["predictions"]
    for mine, theirs in zip(got, expected):
        assert mine["classes"][0] == theirs.classes[0]
        mine_by_class = dict(zip(mine["classes"], mine["probabilities"]))
        for name, p in zip(theirs.classes, theirs.probabilities):
            assert mine_by_class[name] == pytest.approx(p, abs=1e-4)


def test_a_raw_image_body_is_one_image(torch_backend, digit_files):
    with serving(torch_backend) as client:
        png = digit_files[0].read_bytes()
        raw = client.post("/v1/predict?top_k=2", content=png, headers={"Content-Type": "image/png"})
        form = client.post("/v1/predict?top_k=2", files=multipart(digit_files[:1]))
    assert raw.status_code == 200 and raw.json() == form.json()
    assert len(raw.json()["predictions"]) == 1 and len(raw.json()["predictions"][0]["classes"]) == 2


def test_model_health_docs_and_page_routes(torch_backend):
    with serving(torch_backend) as client:
        model = client.get("/v1/model").json()
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
        page = client.get("/")
    assert model["name"] == "lenet5" and model["in_shape"] == [1, 28, 28] and len(model["classes"]) == 10
    assert model["backend"] == "torch" and len(model["sha256"]) == 64 and 0 < model["test_accuracy"] <= 1
    assert set(model["normalization"]) == {"mean", "std"}
    assert model["framing"]["background"] == "dark" and 0 < model["ood"]["threshold"] < 1
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h1>lenet5</h1>" in page.text and "http://testserver/v1/predict" in page.text


@pytest.mark.parametrize(
    "request_kwargs, status, reason",
    [
        ({"content": b"x" * 2**20 * 2, "headers": {"Content-Type": "image/png"}}, 413, "too_large"),  # declared
        ({"content": iter([b"x" * 2**19] * 4), "headers": {"Content-Type": "image/png"}}, 413, "too_large"),  # chunked
        ({"content": b"x" * 2**20 * 2, "headers": {"Content-Type": "image/png", "Content-Length": "10"}}, 413,
         "too_large"),  # lying Content-Length
        ({"files": [("file", ("big.png", b"x" * 2**20 * 2, "image/png"))]}, 413, "too_large"),  # multipart
        ({"content": BOMB, "headers": {"Content-Type": "image/png"}}, 413, "too_many_pixels"),
        ({"files": [("file", ("bomb.png", BOMB, "image/png"))]}, 413, "too_many_pixels"),
        ({"content": b"hello, not an image", "headers": {"Content-Type": "image/png"}}, 415, "not_an_image"),
        ({"content": FAKE_PNG[: len(FAKE_PNG) // 2], "headers": {"Content-Type": "image/png"}}, 415, "not_an_image"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "not_an_image"),
        ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}, 422, "bad_request"),
        ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 422,
         "bad_request"),
        ({"data": {"other": "field"}, "files": [("image", ("a.png", FAKE_PNG, "image/png"))]}, 422, "bad_request"),
        ({"files": [("file", ("a.png", FAKE_PNG, "image/png"))] * 5}, 422, "bad_request"),  # over --max-batch
    ],
    ids=["declared-size", "chunked", "lying-length", "multipart-size", "bomb", "multipart-bomb", "text",
         "truncated-png", "json", "no-boundary", "bad-multipart", "no-file-field", "too-many-files"],
)  # fmt: skip
def test_bad_input_is_refused_with_a_reason_and_counted(request_kwargs, status, reason):
    backend = FakeBackend()
    with serving(backend, max_body_mb=1, max_batch=4) as client:
        response = client.post("/v1/predict", **request_kwargs)
        assert response.status_code == status, response.text
        assert response.json()["reason"] == reason and response.json()["error"]
        metrics = client.get("/metrics").text
        assert client.post("/v1/predict", files=[("file", ("ok.png", FAKE_PNG, "image/png"))]).status_code == 200
    assert metric(metrics, "cnnlab_rejected_total", reason=reason) == 1
    assert metric(metrics, "cnnlab_requests_total", route="/v1/predict", status=str(status)) == 1
    assert backend.batches == [1, 4, 1]  # the warm-up's two calls, then only the good image reached the model


def test_a_bad_top_k_is_a_bad_request():
    with serving(FakeBackend()) as client:
        response = client.post("/v1/predict?top_k=0", content=FAKE_PNG, headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and response.json()["reason"] == "bad_request"
    assert "top_k" in response.json()["error"]


def test_an_unknown_route_or_method_is_refused_in_the_same_shape():
    with serving(FakeBackend()) as client:
        missing, wrong = client.get("/v2/predict"), client.get("/v1/predict")
        counted = client.get("/metrics").text
    assert missing.status_code == 404
    assert missing.json() == {"error": "no route /v2/predict: the routes are listed at /docs", "reason": "not_found"}
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {"error": "/v1/predict does not take GET: see /docs", "reason": "method_not_allowed"}
    assert "cnnlab_rejected_total{" not in counted  # not inputs refused


def test_more_waiting_requests_than_max_pending_is_503_at_once():
    with serving(FakeBackend(), max_pending=1, window_ms=1000) as client:
        service = client.app.state.service
        first: list = []
        thread = threading.Thread(target=lambda: first.append(
            client.post("/v1/predict", content=FAKE_PNG, headers={"Content-Type": "image/png"})))  # fmt: skip
        thread.start()
        wait_until(lambda: service.batcher.pending == 1)  # waiting out its 1 s window
        assert metric(client.get("/metrics").text, "cnnlab_pending_requests") == 1
        second = client.post("/v1/predict", content=FAKE_PNG, headers={"Content-Type": "image/png"})
        thread.join(10)
        metrics = client.get("/metrics").text
    assert second.status_code == 503 and second.json()["reason"] == "overloaded" and second.headers["retry-after"]
    assert first[0].status_code == 200
    assert metric(metrics, "cnnlab_rejected_total", reason="overloaded") == 1


def test_readyz_is_503_until_warm_while_healthz_answers():
    backend = FakeBackend(gate_open=False)  # the warm-up blocks in the model
    with serving(backend) as client:
        try:
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
        finally:
            backend.gate.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)


def test_metrics_follow_the_requests(torch_backend, digit_files):
    with serving(torch_backend) as client:
        before = client.get("/metrics").text
        answers = [client.post("/v1/predict", files=multipart(digit_files)).json() for _ in range(2)]
        after = client.get("/metrics").text
    assert metric(before, "cnnlab_requests_total", route="/v1/predict", status="200") == 0
    assert metric(after, "cnnlab_requests_total", route="/v1/predict", status="200") == 2
    assert metric(after, "cnnlab_request_latency_seconds_count", route="/v1/predict") == 2
    assert metric(after, "cnnlab_batch_size_count") == 2 and metric(after, "cnnlab_batch_size_sum") == 16
    top1 = [p["classes"][0] for p in answers[0]["predictions"]]
    for name in set(top1):
        assert metric(after, "cnnlab_predictions_total", **{"class": name}) == 2 * top1.count(name)
        assert metric(after, "cnnlab_class_share", **{"class": name}) == pytest.approx(top1.count(name) / 8)
    # Test images look like the training images: normalized pixels near mean 0, std 1.
    assert abs(metric(after, "cnnlab_input_mean")) < 0.3 and 0.7 < metric(after, "cnnlab_input_std") < 1.3
    assert metric(before, "cnnlab_input_std") == 0


def test_the_request_log_has_one_line_per_request_and_no_image(tmp_path, torch_backend, digit_files):
    log = tmp_path / "requests.jsonl"
    with serving(torch_backend, log=log) as client:
        client.post("/v1/predict", files=multipart(digit_files[:2]))
        client.post("/v1/predict", content=b"junk", headers={"Content-Type": "image/png"})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    predict = [r for r in records if r["route"] == "/v1/predict"]
    assert [r["status"] for r in predict] == [200, 415]
    assert len(predict[0]["classes"]) == 2 and predict[1]["reason"] == "not_an_image"
    assert all({"time", "route", "status", "latency_ms"} <= r.keys() for r in records)
    assert "junk" not in log.read_text()


def test_a_users_picture_is_framed_as_by_cnnlab_predict(trained_run, torch_backend, tmp_path):
    digits = load_splits("digits", None, 0.1, 0).test.images[:4]
    pictures = [tmp_path / f"picture{i}.png" for i in range(len(digits))]
    for path, image in zip(pictures, digits):
        path.write_bytes(png(users_picture(image)))
    expected = Predictor.load(trained_run).predict_files(pictures, top_k=3)
    assert 640 * 480 > INLINE_PIXELS  # decoded on a thread; the 28x28 digits of the tests above, on the event loop
    with serving(torch_backend) as client:
        response = client.post("/v1/predict?top_k=3", files=multipart(pictures))
    assert response.json()["predictions"] == [p.to_dict() for p in expected]


def test_out_of_distribution_inputs_are_flagged_in_the_answer_and_counted(torch_backend, digit_files):
    generator = torch.Generator().manual_seed(0)
    noise = [png_bytes(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=generator)) for _ in range(16)]
    with serving(torch_backend) as client:
        digits = client.post("/v1/predict", files=multipart(digit_files)).json()["predictions"]
        noisy = client.post("/v1/predict", files=[("file", ("n.png", n, "image/png")) for n in noise]).json()
        metrics = client.get("/metrics").text
    flags = [p["out_of_distribution"] for p in digits + noisy["predictions"]]
    assert all(isinstance(flag, bool) for flag in flags)
    assert sum(p["out_of_distribution"] for p in noisy["predictions"]) > sum(p["out_of_distribution"] for p in digits)
    assert metric(metrics, "cnnlab_out_of_distribution_total") == sum(flags)
    assert metric(metrics, "cnnlab_out_of_distribution_share") == pytest.approx(sum(flags) / len(flags))


def test_a_model_without_a_calibrated_check_flags_nothing():
    with serving(FakeBackend()) as client:
        answer = client.post("/v1/predict", content=FAKE_PNG, headers={"Content-Type": "image/png"}).json()
        metrics = client.get("/metrics").text
    assert answer["predictions"][0]["out_of_distribution"] is None
    assert metric(metrics, "cnnlab_out_of_distribution_total") == 0
