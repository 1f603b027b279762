"""CPU deployment with OpenVINO: ``dinodet export --format openvino`` and ``dinodet predict --backend openvino``.

One export per module (the tiny model with random weights, dynamic shapes, the test resize: about a
minute on a 2-core CPU, nearly all of it the ONNX export the IR is converted from).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from conftest import SAMPLE_NAMES, TEST_MAX_SIZE, TEST_SIZE, one_line_export_error, same_records

from dinodet.cli import main
from dinodet.errors import CheckpointError
from dinodet.inference.detector import Detector
from dinodet.inference.onnx_runtime import METADATA_FORMAT
from dinodet.inference.openvino_runtime import RT_INFO_SECTION, OpenVinoDetector

SIZE_ARGS = ["--size", str(TEST_SIZE), "--max-size", str(TEST_MAX_SIZE)]


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint as an OpenVINO IR, through the CLI: dynamic shapes, the test resize."""
    pytest.importorskip("openvino", reason="the 'openvino' package (pip install 'dinodet[openvino]')")
    out = tmp_path_factory.mktemp("ov") / "tiny.xml"
    torch.set_num_threads(1)
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino", "--out", str(out),
                 "--dynamic", *SIZE_ARGS]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.bin", "tiny.xml"]  # no temporary left
    return out


@pytest.fixture
def two_photos(tmp_path: Path, sample_images: list[Path]) -> Path:
    """Two vendored photos of different sizes (640x480 and 512x640) in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images[:2]:
        shutil.copy(p, folder / p.name)
    return folder


def test_ir_carries_the_metadata_and_float32_weights(ir: Path):
    import openvino as ov

    model = ov.Core().read_model(str(ir))
    meta = {k: str(v) for k, v in model.get_rt_info([RT_INFO_SECTION]).value.items()}
    assert meta["format"] == METADATA_FORMAT and meta["preset"] == "tiny" and meta["dynamic"] == "true"
    assert (meta["size"], meta["max_size"]) == (str(TEST_SIZE), str(TEST_MAX_SIZE))
    assert len(json.loads(meta["class_names"])) == int(meta["num_classes"])
    assert 'element_type="f16"' not in ir.read_text()  # ov.save_model would halve the weights by default
    detector = OpenVinoDetector(ir)
    assert detector.fixed_batch is None and detector.fixed_hw is None and detector.metadata == meta


def test_predict_openvino_backend_matches_torch(ir: Path, tiny_checkpoint: Path, two_photos: Path, tmp_path: Path,
                                                one_thread):
    common = [str(two_photos), "--threshold", "0"]
    assert main(["predict", *common, "--checkpoint", str(tiny_checkpoint), *SIZE_ARGS,
                 "--out", str(tmp_path / "torch")]) == 0
    # the resize comes from the IR's metadata; the backend from the .xml suffix
    assert main(["predict", *common, "--model", str(ir), "--out", str(tmp_path / "ov")]) == 0
    ref = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    got = json.loads((tmp_path / "ov" / "predictions.json").read_text())
    assert {r["file_name"] for r in got} == set(SAMPLE_NAMES[:2])
    same_records(ref, got, "openvino")


def test_static_and_dynamic_compilations_agree(ir: Path, tiny_detector: Detector, sample_images: list[Path],
                                               one_thread):
    """The first shape gets a static compilation, the second runs the dynamic one: both are the torch model's."""
    detector = OpenVinoDetector(ir, static_shapes=1)
    got = detector.predict(sample_images[:2], threshold=0.0)
    assert set(detector._compiled) == {(1, 3, 160, 213), "dynamic"}
    assert detector._compiled["dynamic"].get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads() == 1
    for ref, pred in zip(tiny_detector.predict(sample_images[:2], threshold=0.0), got):
        assert torch.equal(ref.labels, pred.labels)
        torch.testing.assert_close(pred.scores, ref.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(pred.boxes, ref.boxes, rtol=1e-3, atol=1e-2)


# -------------------------------------------------------------------------------------- errors


def test_predict_openvino_errors_are_one_line(ir: Path, two_photos: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]):
    import onnx

    image, out = str(two_photos / SAMPLE_NAMES[0]), str(tmp_path / "o")
    assert main(["predict", image, "--backend", "openvino", "--out", out]) == 2
    one_line_export_error(capsys, "--backend openvino needs --model")
    assert main(["predict", image, "--backend", "onnxruntime", "--model", str(ir), "--out", out]) == 2
    one_line_export_error(capsys, "OpenVINO IR", "--backend openvino")
    assert main(["predict", image, "--model", str(tmp_path / "missing.xml"), "--out", out]) == 2
    one_line_export_error(capsys, "OpenVINO model not found")
    assert main(["predict", image, "--model", str(ir), "--mode", "compile", "--out", out]) == 2
    one_line_export_error(capsys, "--mode applies to the PyTorch backend")
    # an ONNX file read by OpenVINO: its metadata is checked as onnxruntime's backend checks it
    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi[:1], vi[1:])), str(plain))
    assert main(["predict", image, "--backend", "openvino", "--model", str(plain), "--out", out]) == 2
    one_line_export_error(capsys, "not a dinodet ONNX export")
    model = onnx.load(str(plain))
    onnx.helper.set_model_props(model, {"format": METADATA_FORMAT, "preset": "tiny", "class_names": "[oops"})
    onnx.save(model, str(plain))
    with pytest.raises(CheckpointError, match="invalid dinodet metadata"):
        OpenVinoDetector(plain)
    (tmp_path / "broken.xml").write_text("<net>")
    assert main(["predict", image, "--model", str(tmp_path / "broken.xml"), "--out", out]) == 2
    one_line_export_error(capsys, "not a readable OpenVINO IR or ONNX model")


def test_missing_openvino_is_one_line(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, two_photos: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    hint = "pip install 'dinodet[openvino]'"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino",
                 "--out", str(tmp_path / "m.xml")]) == 2
    one_line_export_error(capsys, hint)
    (tmp_path / "m.xml").write_text("<net/>")
    assert main(["predict", str(two_photos), "--model", str(tmp_path / "m.xml"), "--out", str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, hint)
