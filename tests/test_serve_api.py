"""``dinodet serve``: the HTTP API gives ``dinodet predict``'s detections, every bad input is a 4xx JSON
answer after which the service still answers, /metrics counts it all, dynamic batching gives batch-1
results, a full queue (in requests or in bytes of decoded images) is a 503 with Retry-After, --max-batch
auto resolves per device, the API key is enforced, and SIGTERM lets an in-flight request finish (the
CLI run end to end in a subprocess)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import httpx
from conftest import COCO128_IMAGES, TEST_MAX_SIZE, TEST_SIZE
from fastapi.testclient import TestClient
from PIL import Image

from dinodet.serve import BackgroundServer, DynamicBatcher, ServeOptions, create_app

# the random tiny model scores below ~0.05: a threshold that keeps a few dozen detections per image
THRESHOLD = 0.03
SAME_SHAPE = ("000000000009.jpg", "000000000250.jpg")  # both 640x480: one resized shape, one batch


def detect_body(answer: dict) -> list[tuple]:
    return [(d["class_name"], d["category_id"], d["score"], d["bbox"]) for d in answer["detections"]]


def assert_same_detections(answer: dict, pred, box_tol: float = 1e-3) -> None:
    """The API's answer holds ``pred``'s detections (a Prediction): same labels and order, boxes
    within ``box_tol`` px, scores within 1e-5."""
    assert answer["image_size"] == list(pred.image_size)
    got = answer["detections"]
    assert len(got) == len(pred) > 0
    for d, box, score, cat, name in zip(got, pred.boxes.tolist(), pred.scores.tolist(), pred.category_ids.tolist(),
                                        pred.class_names):
        assert (d["class_name"], d["category_id"]) == (name, cat)
        assert abs(d["score"] - score) <= 1e-5
        assert max(abs(a - b) for a, b in zip(d["bbox"], box)) <= box_tol


@pytest.fixture(scope="module")
def client(tiny_detector):
    app = create_app(tiny_detector, ServeOptions(max_image_mb=1.0, max_batch=4, max_wait_ms=5))
    with TestClient(app) as c:
        yield c


def test_detect_gives_the_library_prediction(client, tiny_detector, sample_images):
    for path in sample_images:  # one of them greyscale
        expected = tiny_detector.predict(path, threshold=THRESHOLD)[0]
        multipart = client.post(f"/v1/detect?threshold={THRESHOLD}", files={"image": (path.name, path.read_bytes())})
        assert multipart.status_code == 200, multipart.text
        assert_same_detections(multipart.json(), expected)
        as_json = client.post(f"/v1/detect?threshold={THRESHOLD}",
                              json={"image": base64.b64encode(path.read_bytes()).decode()})
        assert as_json.status_code == 200, as_json.text
        assert detect_body(as_json.json()) == detect_body(multipart.json())
        answer = multipart.json()
        assert answer["model"]["preset"] == "tiny" and answer["model"]["backend"] == "torch"
        assert set(answer["timing_ms"]) == {"decode", "queue", "inference", "total"}


def test_classes_and_max_det_select_like_predict(client, sample_images):
    path = sample_images[0]
    full = client.post(f"/v1/detect?threshold={THRESHOLD}", files={"image": path.read_bytes()}).json()["detections"]
    top = client.post(f"/v1/detect?threshold={THRESHOLD}&max_det=3", files={"image": path.read_bytes()}).json()
    assert top["detections"] == full[:3]
    name, cat = full[0]["class_name"], full[0]["category_id"]
    other = next(d["category_id"] for d in full if d["class_name"] != name)
    picked = client.post(f"/v1/detect?threshold={THRESHOLD}&classes={name},{other}",
                         files={"image": path.read_bytes()}).json()["detections"]
    assert picked == [d for d in full if d["category_id"] in (cat, other)]


def test_model_health_ready(client, tiny_detector):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True}
    info = client.get("/v1/model").json()
    assert info["preset"] == "tiny" and info["input"]["resize"] == {"size": TEST_SIZE, "max_size": TEST_MAX_SIZE}
    assert [c["name"] for c in info["classes"]] == tiny_detector.class_names
    assert info["input"]["image_urls"] is False
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "<canvas" in page.text and "http" not in re.sub(r'xmlns="[^"]*"', "", page.text)
    for name in ("app.js", "style.css"):
        static = client.get(f"/static/{name}")
        assert static.status_code == 200 and "https://" not in static.text and "http://" not in static.text


def _png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def _bad_requests(photo: bytes) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx request arguments, status, reason counted in /metrics)."""
    return {
        "not an image": ({"files": {"image": ("a.jpg", b"this is not a JPEG")}}, 400, "not_an_image"),
        "truncated": ({"files": {"image": ("t.jpg", photo[: len(photo) // 2])}}, 400, "bad_image"),
        "decompression bomb": ({"files": {"image": ("bomb.png", _png(30_000, 30_000))}}, 413, "too_many_pixels"),
        "oversized": ({"files": {"image": ("big.jpg", photo + b"\0" * (1 << 20))}}, 413, "too_large"),
        "oversized json": ({"json": {"image": base64.b64encode(b"\0" * (3 << 20)).decode()}}, 413, "too_large"),
        "content type": ({"content": photo, "headers": {"content-type": "image/jpeg"}}, 415,
                         "unsupported_media_type"),
        "unknown class": ({"files": {"image": photo}, "params": {"classes": "person,unicorn"}}, 400, "bad_classes"),
        "threshold": ({"files": {"image": photo}, "params": {"threshold": "1.5"}}, 422, "invalid_parameter"),
        "max_det": ({"files": {"image": photo}, "params": {"max_det": "0"}}, 422, "invalid_parameter"),
        "no image field": ({"files": {"picture": photo}}, 400, "no_image"),
        "bad base64": ({"json": {"image": "***not base64***"}}, 400, "bad_base64"),
        "not json": ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
        "image url": ({"json": {"image": "https://example.com/a.jpg"}}, 400, "image_url"),
    }


def test_bad_inputs_are_4xx_json_and_the_service_goes_on(client, sample_images):
    photo = sample_images[0].read_bytes()
    before = _metrics(client)
    bad = _bad_requests(photo)
    for name, (kwargs, status, _) in bad.items():
        answer = client.post("/v1/detect", **kwargs)
        assert answer.status_code == status, (name, answer.text)
        body = answer.json()
        assert body["status"] == status and isinstance(body["error"], str) and body["error"], name
        assert "\n" not in body["error"] and "Traceback" not in body["error"], name
        good = client.post("/v1/detect", files={"image": photo})
        assert good.status_code == 200, (name, good.text)
    after = _metrics(client)
    for name, (_, _, reason) in bad.items():
        assert after[f'dinodet_errors_total{{reason="{reason}"}}'] > before.get(
            f'dinodet_errors_total{{reason="{reason}"}}', 0), name
    ok = 'dinodet_requests_total{method="POST",route="/v1/detect",status="200"}'
    assert after[ok] - before.get(ok, 0) == len(bad)
    assert sum(v for k, v in after.items() if k.startswith("dinodet_errors_total")) - sum(
        v for k, v in before.items() if k.startswith("dinodet_errors_total")) == len(bad)
    assert after['dinodet_request_latency_seconds_count{route="/v1/detect"}'] >= 2 * len(bad)
    assert "dinodet_queue_depth" in after


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_dynamic_batches_give_batch_one_results(tiny_detector):
    images = [Image.open(COCO128_IMAGES / n).convert("RGB") for n in (*SAME_SHAPE, "000000000030.jpg")]
    sizes: list[int] = []
    batcher = DynamicBatcher(tiny_detector, max_batch=4, max_wait_ms=2000, max_queue=8, on_batch=sizes.append)
    batcher.start()
    try:
        # the first request waits (max_wait) for same-shape ones; the 640x428 image runs apart
        futures = [batcher.submit(im) for im in (images[0], images[1], images[0], images[2])]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    assert sorted(sizes) == [1, 3] and [r.batch_size for r in results] == [3, 3, 3, 1]
    for im, r in zip((images[0], images[1], images[0], images[2]), results):
        alone = tiny_detector.predict(im, threshold=0.0)[0]
        assert r.prediction.labels.tolist() == alone.labels.tolist()
        assert (r.prediction.boxes - alone.boxes).abs().max() <= 1e-3
        assert (r.prediction.scores - alone.scores).abs().max() <= 1e-5


class GatedDetector:
    """tiny_detector whose predict waits until ``gate`` is set: requests pile up in the queue."""

    def __init__(self, detector) -> None:
        self.detector, self.gate, self.entered = detector, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def predict(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        return self.detector.predict(*args, **kwargs)


def test_full_queue_is_503_and_oversize_413_over_http(tiny_detector, sample_images):
    gated = GatedDetector(tiny_detector)
    photo = sample_images[0].read_bytes()
    answers: list[httpx.Response] = []
    options = ServeOptions(port=0, max_batch=1, max_queue=1, max_wait_ms=0, max_image_mb=0.5)
    with BackgroundServer(gated, options) as server:
        # over real HTTP, an oversized upload is refused as it arrives (declared or chunked)
        big = httpx.post(server.url + "/v1/detect", files={"image": ("big.jpg", b"\0" * (1 << 20))}, timeout=60)
        assert big.status_code == 413 and "0.5 MB" in big.json()["error"]
        chunks = (b"\0" * (1 << 16) for _ in range(16))  # no Content-Length
        chunked = httpx.post(server.url + "/v1/detect", content=chunks, timeout=60,
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        def post() -> None:
            answers.append(httpx.post(server.url + "/v1/detect", files={"image": photo}, timeout=60))

        first = threading.Thread(target=post)
        first.start()
        assert gated.entered.wait(30)  # the first request is in the model
        second = threading.Thread(target=post)
        second.start()
        deadline = time.monotonic() + 30
        while server.app.state.batcher.depth < 1 and time.monotonic() < deadline:  # the second one waits
            time.sleep(0.01)
        third = httpx.post(server.url + "/v1/detect", files={"image": photo}, timeout=60)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "retry later" in third.json()["error"]
        gated.gate.set()
        first.join(60)
        second.join(60)
        assert [a.status_code for a in answers] == [200, 200]
        assert httpx.post(server.url + "/v1/detect", files={"image": photo}, timeout=60).status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert 'dinodet_errors_total{reason="queue_full"} 1.0' in metrics


def test_api_key(tiny_detector, sample_images, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-key\n")
    app = create_app(tiny_detector, ServeOptions(api_key_file=key_file))
    photo = sample_images[0].read_bytes()
    with TestClient(app) as c:
        for path in ("/v1/model", "/metrics"):
            assert c.get(path).status_code == 401
        # 401 before anything else is looked at (here an out-of-range threshold)
        assert c.post("/v1/detect?threshold=7", files={"image": photo}).status_code == 401
        refused = c.post("/v1/detect", files={"image": photo}, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert c.post("/v1/detect", files={"image": photo}, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.post("/v1/detect", files={"image": photo}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # probes and the page stay open


def test_cli_checks_options_before_loading(capsys, tmp_path):
    from dinodet.cli import main

    assert main(["serve", "--random-weights", "--preset", "tiny", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dinodet: error: --max-batch must be >= 1, got 0"
    (tmp_path / "empty.txt").write_text("")
    assert main(["serve", "--random-weights", "--preset", "tiny", "--api-key-file", str(tmp_path / "empty.txt")]) == 2
    assert "must hold the key alone" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("dinodet: error: ")


def test_missing_extra_is_one_line(monkeypatch):
    from dinodet.errors import ConfigError
    from dinodet.serve import require_serve

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"'prometheus-client' package: pip install 'dinodet\[serve\]'"):
        require_serve()


def _dinodet(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("dinodet")), *args]


def test_cli_serve_equals_cli_predict_and_stops_gracefully(tiny_checkpoint, sample_images, tmp_path, size_args):
    """End to end: `dinodet serve` (subprocess, API key) answers what `dinodet predict` writes, and on
    SIGTERM finishes the request in flight, then exits 0."""
    from dinodet.cli import main

    (tmp_path / "key").write_text("k3y")
    serve = subprocess.Popen(
        # --max-batch 8: on a CPU auto is 1, and a request would not wait in the batcher for company
        _dinodet("serve", "--checkpoint", str(tiny_checkpoint), *size_args, "--port", "0", "--max-batch", "8",
                 "--max-wait-ms", "1000", "--api-key-file", str(tmp_path / "key")),
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # `dinodet predict` in this process while the server starts (a second torch import costs seconds)
        assert main(["predict", *map(str, sample_images), "--checkpoint", str(tiny_checkpoint), *size_args,
                     "--out", str(tmp_path / "out"), "--no-save-images", "--threshold", str(THRESHOLD)]) == 0
        records = json.loads((tmp_path / "out" / "predictions.json").read_text())
        url = _wait_for_url(serve)
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.post(url + "/v1/detect", files={"image": sample_images[0].read_bytes()}).status_code == 401
        for path in sample_images:
            answer = httpx.post(f"{url}/v1/detect?threshold={THRESHOLD}", files={"image": path.read_bytes()},
                                headers=auth, timeout=60).json()
            expected = [r for r in records if r["file_name"] == path.name]
            assert len(answer["detections"]) == len(expected) > 0
            for d, r in zip(answer["detections"], expected):  # both sorted by score
                x0, y0, x1, y1 = d["bbox"]
                assert (d["category_id"], d["class_name"]) == (r["category_id"], r["class_name"])
                # predictions.json rounds to 0.01 px (xywh)
                assert max(abs(a - b) for a, b in zip((x0, y0, x1 - x0, y1 - y0), r["bbox"])) <= 0.011
        # SIGTERM while a request waits in the batcher (max-wait 1 s): it is answered, then the process ends
        late: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: late.append(httpx.post(
            url + "/v1/detect", files={"image": sample_images[0].read_bytes()}, headers=auth, timeout=60)))
        thread.start()
        deadline = time.monotonic() + 30
        while "dinodet_queue_depth 1.0" not in httpx.get(url + "/metrics", headers=auth).text:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.01)
        serve.send_signal(signal.SIGTERM)
        thread.join(60)
        assert serve.wait(60) == 0
        assert [r.status_code for r in late] == [200]
        assert "dinodet: stopped" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _wait_for_url(process: subprocess.Popen) -> str:
    """The URL in the server's "serving on URL" line (stderr), once it is printed."""
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"serving on (http://\S+)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"the server exited ({process.wait()}) without serving")


# ------------------------------------------------------------------ --max-batch auto, --max-queue-mb


def test_max_batch_auto_resolves_per_device():
    import torch

    from dinodet.serve.batching import resolve_max_batch

    assert resolve_max_batch("auto", torch.device("cpu"))[0] == 1  # a batch costs its images one by one
    assert resolve_max_batch("auto", "cpu")[0] == 1
    assert resolve_max_batch("auto", "CPU")[0] == 1  # OpenVINO's device names
    assert resolve_max_batch("auto", torch.device("cuda", 1))[0] == 8  # no GPU needed to name one
    assert resolve_max_batch("AUTO", "cuda:0")[0] == 8
    number, why = resolve_max_batch(4, torch.device("cuda"))
    assert (number, why) == (4, "--max-batch")  # an explicit number wins
    assert resolve_max_batch("3", "cpu")[0] == 3  # as the CLI passes it
    # an export with a fixed batch of 2 runs 2 images a pass anyway (padding with copies): auto takes 2
    assert resolve_max_batch("auto", "cpu", fixed_batch=2)[0] == 2
    assert resolve_max_batch(1, "cpu", fixed_batch=2)[0] == 1
    for bad, message in (("lots", "'auto' or a whole number"), (0, ">= 1, got 0"), ("2.5", "'auto' or")):
        with pytest.raises(ValueError, match=message):
            resolve_max_batch(bad, "cpu")


class OnCuda:
    """tiny_detector claiming to run on a GPU (it still runs on the CPU): what /v1/model resolves from."""

    def __init__(self, detector) -> None:
        import torch

        self.detector, self.device = detector, torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self.detector, name)


def test_model_reports_the_resolved_max_batch(tiny_detector, caplog):
    cases = ((tiny_detector, ServeOptions(), 1, "auto", "auto on a CPU"),
             (OnCuda(tiny_detector), ServeOptions(), 8, "auto", "auto on cuda"),
             (OnCuda(tiny_detector), ServeOptions(max_batch=2), 2, "2", "--max-batch"),
             (tiny_detector, ServeOptions(max_batch=3), 3, "3", "--max-batch"))
    for detector, options, number, option, reason in cases:
        caplog.clear()
        with caplog.at_level("INFO", logger="dinodet.serve.app"), TestClient(create_app(detector, options)) as c:
            batching = c.get("/v1/model").json()["batching"]
            buckets = re.findall(r'dinodet_batch_size_bucket\{le="([\d.]+)"\}', c.get("/metrics").text)
        assert (batching["max_batch"], batching["max_batch_option"]) == (number, option), batching
        assert batching["max_batch_reason"].startswith(reason)
        assert batching["max_queue_mb"] == 1024.0
        assert f"at most {number} image(s) per forward pass" in caplog.text  # said at startup
        assert max(float(b) for b in buckets) == number  # the histogram follows the resolved value


def test_cli_max_batch_and_queue_mb_are_checked_before_loading(capsys):
    from dinodet.cli import main

    assert main(["serve", "--random-weights", "--preset", "tiny", "--max-batch", "lots"]) == 2
    assert capsys.readouterr().err.strip() == ("dinodet: error: --max-batch must be 'auto' or a whole number >= 1, "
                                               "got 'lots'")
    assert main(["serve", "--random-weights", "--preset", "tiny", "--max-queue-mb", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dinodet: error: --max-queue-mb must be > 0, got 0.0"


PHOTO_BYTES = 640 * 480 * 4  # a decoded 640x480 photo: Pillow holds RGB in 4 bytes a pixel


def test_batcher_bounds_the_queued_bytes(tiny_detector):
    from dinodet.serve.batching import QueueMemoryError, image_nbytes

    photo = Image.open(COCO128_IMAGES / SAME_SHAPE[0]).convert("RGB")
    small = photo.resize((64, 48))
    assert (image_nbytes(photo), image_nbytes(small), image_nbytes(photo.convert("L"))) == (
        PHOTO_BYTES, 64 * 48 * 4, 640 * 480)
    gated = GatedDetector(tiny_detector)
    # room for one photo and a bit: the count bound (8) is not what refuses here
    batcher = DynamicBatcher(gated, max_batch=1, max_wait_ms=0, max_queue=8, max_queue_bytes=PHOTO_BYTES + 20_000)
    batcher.start()
    try:
        first = batcher.submit(photo)
        assert gated.entered.wait(30)  # in the model: no longer queued
        assert batcher.queued_bytes == 0
        queued = [batcher.submit(photo)]
        assert batcher.queued_bytes == PHOTO_BYTES
        with pytest.raises(QueueMemoryError, match=r"would pass the limit of 1.19\d* MB \(--max-queue-mb\)"):
            batcher.submit(photo)
        queued.append(batcher.submit(small))  # a small image still fits beside it
        assert batcher.queued_bytes == PHOTO_BYTES + 64 * 48 * 4 and batcher.depth == 2
        batcher.check_room(5_000)  # what the service asks before decoding an upload
        with pytest.raises(QueueMemoryError):
            batcher.check_room(PHOTO_BYTES)
        gated.gate.set()
        assert all(f.result(timeout=60).batch_size == 1 for f in (first, *queued))
        assert batcher.queued_bytes == 0
    finally:
        gated.gate.set()
        batcher.stop()
    # one image larger than the whole bound is still served when nothing waits (else never)
    lone = DynamicBatcher(tiny_detector, max_batch=1, max_queue_bytes=1000)
    lone.start()
    try:
        assert len(lone.submit(small).result(timeout=60).prediction) > 0
    finally:
        lone.stop()


def test_queue_memory_bound_is_503_over_http(tiny_detector, sample_images):
    gated = GatedDetector(tiny_detector)
    photo = (COCO128_IMAGES / SAME_SHAPE[0]).read_bytes()  # 640x480
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((64, 48)).save(buf, format="PNG")
    small = buf.getvalue()
    answers: list[httpx.Response] = []
    # a bound of 2 MB holds one queued photo (1.17 MB decoded) but not two; 8 requests may wait
    options = ServeOptions(port=0, max_batch=1, max_wait_ms=0, max_queue=8, max_queue_mb=2.0)
    with BackgroundServer(gated, options) as server:
        def post(data: bytes) -> None:
            answers.append(httpx.post(server.url + "/v1/detect", files={"image": data}, timeout=60))

        try:
            _fill_and_refuse(server, gated, post, photo, small)
        finally:
            gated.gate.set()  # a failed check must not leave the server waiting for the gate
        assert [a.status_code for a in answers] == [200, 200, 200]
        after = httpx.post(server.url + "/v1/detect", files={"image": photo}, timeout=60)  # the next one is served
        assert after.status_code == 200
        metrics = _scrape(server.url)
        assert metrics['dinodet_errors_total{reason="queue_memory"}'] == 1
        assert metrics["dinodet_queue_bytes"] == 0
        assert httpx.get(server.url + "/v1/model").json()["batching"]["max_queue_mb"] == 2.0


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _fill_and_refuse(server, gated, post, photo: bytes, small: bytes) -> None:
    """One photo in the model, one queued: a third photo is refused by the bytes bound, a small image
    is queued; then the gate opens and all three finish."""
    first = threading.Thread(target=post, args=(photo,))
    first.start()
    assert gated.entered.wait(30)  # the first photo is in the model
    second = threading.Thread(target=post, args=(photo,))
    second.start()
    deadline = time.monotonic() + 30
    while server.app.state.batcher.depth < 1 and time.monotonic() < deadline:  # the second one waits
        time.sleep(0.01)
    assert _scrape(server.url)["dinodet_queue_bytes"] == PHOTO_BYTES
    refused = httpx.post(server.url + "/v1/detect", files={"image": photo}, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert "--max-queue-mb" in refused.json()["error"] and "retry later" in refused.json()["error"]
    third = threading.Thread(target=post, args=(small,))  # a small image still gets in
    third.start()
    while server.app.state.batcher.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.state.batcher.depth == 2
    gated.gate.set()
    for thread in (first, second, third):
        thread.join(60)
