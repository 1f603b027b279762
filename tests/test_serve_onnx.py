"""``dinodet serve --model M.onnx``: the service on an exported ONNX model (onnxruntime backend) answers
the detections that ``dinodet predict --backend onnxruntime --model M.onnx`` computes for the same
image (its detector, built by the same ``DetectorOptions``), and ``/v1/model`` says which backend runs.

One export for the module at a small fixed input (1 x 3 x 128 x 160, the resize recorded in the
file): 16-23 s on the 2-core CPU, against about a minute for the dynamic export of ``test_export.py``
(a module fixture there, so not shared).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
httpx = pytest.importorskip("httpx")

from test_serve_api import THRESHOLD, _wait_for_url, assert_same_detections  # noqa: E402

from dinodet.inference.predict import DetectorOptions  # noqa: E402

FIXED_HW = (128, 160)
SIZE, MAX_SIZE = 96, 128  # every sample image resizes to fit FIXED_HW (landscape 128x96, portrait 102x128)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_detector) -> Path:
    """tiny_detector exported at a fixed 1 x 3 x 128 x 160 with the resize SIZE / MAX_SIZE in its metadata."""
    import torch

    from dinodet.deploy.export import to_onnx

    out = tmp_path_factory.mktemp("serve_onnx") / "tiny.onnx"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tracing on a shared 2-core machine: one thread is faster
    try:
        to_onnx(tiny_detector, out, batch_size=1, input_size=FIXED_HW, size=SIZE, max_size=MAX_SIZE)
    finally:
        torch.set_num_threads(threads)
    return out


def test_cli_serve_onnx_answers_the_onnxruntime_prediction(small_onnx: Path, sample_images: list[Path]):
    serve = subprocess.Popen(
        [str(Path(sys.executable).with_name("dinodet")), "serve", "--model", str(small_onnx), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # what `dinodet predict --backend onnxruntime --model M.onnx` runs, here at full precision
        # (its predictions.json rounds boxes to 0.01 px), computed while the server starts
        detector = DetectorOptions(model=small_onnx, backend="onnxruntime").build()
        expected = detector.predict(sample_images, threshold=THRESHOLD)
        url = _wait_for_url(serve)
        info = httpx.get(url + "/v1/model", timeout=60).json()
        assert (info["backend"], info["preset"], info["device"]) == ("onnxruntime", "tiny", "cpu")
        assert info["input"]["resize"] == {"size": SIZE, "max_size": MAX_SIZE}  # from the file's metadata
        assert [c["name"] for c in info["classes"]] == detector.class_names
        batching = info["batching"]  # auto: the file's fixed batch of 1
        assert (batching["max_batch"], batching["max_batch_option"]) == (1, "auto")
        assert batching["max_batch_reason"] == "auto: the model was exported for batches of 1"
        for path, pred in zip(sample_images, expected):  # one of them greyscale, one portrait
            answer = httpx.post(f"{url}/v1/detect?threshold={THRESHOLD}", files={"image": path.read_bytes()},
                                timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"]["backend"] == "onnxruntime"
            assert_same_detections(answer.json(), pred)  # same labels and order, boxes within 1e-3 px
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.wait()
