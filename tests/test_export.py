"""ONNX export (``dinodet export`` / ``dinodet.deploy.export.to_onnx``) and the onnxruntime backend.

An export traces the whole model symbolically (about a minute for the tiny preset with dynamic
shapes on a 2-core CPU), so the tests share three exports: the tiny checkpoint through the CLI with
dynamic shapes and the level_sum MSDA, the same weights through the Python API with a fixed 2x128x160
input, the gather MSDA and the post-processing in the graph, and dino_r50_4scale plus the other
backbone families (Swin with 5 levels, ConvNeXt) with random weights and a fixed small input (slow mark).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import TEST_MAX_SIZE, TEST_SIZE, one_line_export_error, same_records

from dinodet.cli import main
from dinodet.config import ConfigError, DINOConfig
from dinodet.data.coco_classes import COCO_CLASSES
from dinodet.deploy.export import MAX_OPSET, METADATA_FORMAT, MIN_OPSET, ExportError, to_onnx
from dinodet.inference.detector import Detector, preprocess_batch
from dinodet.inference.onnx_runtime import OnnxDetector
from dinodet.models.dino import DINO
from dinodet.models.postprocess import postprocess
from dinodet.presets import get_preset

FIXED_HW = (128, 160)


def session(model: Path | bytes) -> ort.InferenceSession:
    """An onnxruntime CPU session, one thread, of an ONNX file or a serialised model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_detector: Detector) -> Path:
    """Like a training run's checkpoint.pt: raw weights, EMA weights (the tiny_detector's, which predict
    and eval use) and the run's own evaluation resize (the test size, not tiny's default)."""
    from dinodet.checkpoint import save_checkpoint
    from dinodet.config import apply_overrides

    cfg = apply_overrides(tiny_detector.config, [f"data.eval_size={TEST_SIZE}", f"data.max_size={TEST_MAX_SIZE}"])
    torch.manual_seed(1)
    raw = DINO(cfg.model)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, raw, cfg, extra={"ema": {"module": tiny_detector.model.state_dict()}})
    return path


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory: pytest.TempPathFactory, run_checkpoint: Path) -> Path:
    """The run checkpoint exported by the CLI with its own defaults: dynamic shapes, level_sum MSDA,
    logits + boxes, the EMA weights, the run's evaluation resize."""
    out = tmp_path_factory.mktemp("onnx") / "tiny_dynamic.onnx"
    torch.set_num_threads(1)
    assert main(["export", "--checkpoint", str(run_checkpoint), "--format", "onnx", "--out", str(out),
                 "--dynamic"]) == 0
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary file was renamed
    return out


@pytest.fixture(scope="module")
def fixed_gather_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_detector: Detector) -> Path:
    """The same weights through the API: fixed 2x3x128x160, gather MSDA, top-k in the graph, opset 17
    (written as 18 by torch.onnx, then converted down)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny_fixed_gather.onnx"
    torch.set_num_threads(1)
    result = to_onnx(tiny_detector, out, msda="gather", with_postprocess=True, batch_size=2, input_size=FIXED_HW,
                     opset=17)
    assert result.inputs == ["images", "mask", "orig_sizes"] and result.outputs == ["scores", "labels", "boxes"]
    return out


def padded_pair(sample_images: list[Path], size: int, max_size: int) -> tuple[torch.Tensor, ...]:
    """Two differently shaped images batched as the predictor does (the smaller one padded)."""
    return preprocess_batch(sample_images[:2], size, max_size)


def fixed_inputs(sample_images: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A landscape and a portrait image (short side 96) padded to the fixed 128 x 160."""
    images, mask, orig_sizes = padded_pair(sample_images, 96, 160)
    h, w = images.shape[-2:]
    pad = (0, FIXED_HW[1] - w, 0, FIXED_HW[0] - h)
    return F.pad(images, pad), F.pad(mask, pad, value=True), orig_sizes


def torch_outputs(detector: Detector, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = detector.model(images, mask)
    return out.pred_logits, out.pred_boxes


def outputs_for_one_selection(path: Path, detector: Detector, images: torch.Tensor, mask: torch.Tensor,
                              score_tol: float = 1e-4) -> tuple[torch.Tensor, ...]:
    """onnxruntime's (logits, boxes) and PyTorch's for the same encoder top-k selection.

    With random weights some proposal scores are near-tied (seen: 5e-7 apart, Swin-T on a Zen 5 CPU),
    and the two runtimes may rank such a pair either way, which changes those queries' outputs.  As in
    the parity contract, the export is right when onnxruntime's selection is a top-k of PyTorch's scores
    up to ``score_tol`` and the outputs agree given that selection (the model's testing hook).
    """
    model = onnx.load(str(path))
    (topk,) = [n for n in model.graph.node if n.op_type == "TopK" and "query_selection" in n.name]
    model.graph.output.append(onnx.helper.make_tensor_value_info(topk.output[1], onnx.TensorProto.INT64, None))
    logits, boxes, index = session(model.SerializeToString()).run(None, {"images": images.numpy(), "mask": mask.numpy()})
    index = torch.from_numpy(index)

    calls: list[torch.Tensor] = []
    hook = detector.model.query_selection.class_head.register_forward_hook(lambda m, i, o: calls.append(o))
    try:
        with torch.no_grad():
            out = detector.model(images, mask, enc_topk_index=index)
    finally:
        hook.remove()
    scores = max(calls, key=lambda t: t.shape[1]).max(-1)[0]  # [B, S]: the proposals, not the selected queries
    best = scores.topk(index.shape[1], dim=1)[0]
    assert (scores.gather(1, index) - best).abs().max() <= score_tol, "not a top-k of PyTorch's scores"
    return torch.from_numpy(logits), torch.from_numpy(boxes), out.pred_logits, out.pred_boxes


# ------------------------------------------------------------------------------- the file itself


def test_cli_export_writes_checked_onnx_with_metadata(dynamic_onnx: Path, capsys: pytest.CaptureFixture[str]):
    onnx.checker.check_model(str(dynamic_onnx))
    model = onnx.load(str(dynamic_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["preset"] == "tiny" and meta["msda"] == "level_sum" and meta["dynamic"] == "true"
    assert (meta["size"], meta["max_size"]) == (str(TEST_SIZE), str(TEST_MAX_SIZE))  # the checkpoint's resize
    assert json.loads(meta["class_names"]) == list(COCO_CLASSES)
    assert json.loads(meta["category_ids"]) == list(range(91))
    contract = json.loads(meta["input_contract"])
    assert contract["inputs"]["images"]["shape"] == ["batch", 3, "height", "width"]
    assert contract["inputs"]["mask"]["dtype"] == "bool"
    assert contract["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert contract["num_select"] == int(meta["num_select"]) and "caller" in contract["postprocess"]
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    assert shapes == {"images": ["batch", 3, "height", "width"], "mask": ["batch", "height", "width"],
                      "logits": ["batch", "num_queries", 91], "boxes": ["batch", "num_queries", 4]}
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and not any(n.domain not in ("", "ai.onnx") for n in model.graph.node)


@pytest.mark.parametrize("shape", [(1, 96, 128), (1, 131, 99), (2, 0, 0)], ids=["96x128", "131x99", "batch2-padded"])
def test_dynamic_onnx_matches_pytorch(dynamic_onnx: Path, tiny_detector: Detector, sample_images: list[Path],
                                      shape: tuple[int, int, int], one_thread):
    b, h, w = shape
    if b == 2:  # a landscape and a portrait image: both padded to 160 x 240
        images, mask, _ = padded_pair(sample_images, 160, 240)
        assert mask[0].any() or mask[1].any()
    else:  # 131 x 99: not a multiple of 32 (nor of 2)
        images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h))
        mask = torch.zeros(b, h, w, dtype=torch.bool)
    logits, boxes = session(dynamic_onnx).run(None, {"images": images.numpy(), "mask": mask.numpy()})
    ref_logits, ref_boxes = torch_outputs(tiny_detector, images, mask)
    assert logits.shape == tuple(ref_logits.shape) and boxes.shape == tuple(ref_boxes.shape)
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, atol=1e-5, rtol=1e-4)


def test_level_sum_and_gather_variants_agree(dynamic_onnx: Path, fixed_gather_onnx: Path, tiny_detector: Detector,
                                               sample_images: list[Path], one_thread):
    gather_model = onnx.load(str(fixed_gather_onnx), load_external_data=False)
    assert [o.version for o in gather_model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(gather_model, full_check=True)
    gather_ops = {n.op_type for n in gather_model.graph.node}
    assert "GridSample" not in gather_ops and "GatherElements" in gather_ops and "TopK" in gather_ops
    images, mask, orig_sizes = fixed_inputs(sample_images)
    feed = {"images": images.numpy(), "mask": mask.numpy()}
    gather_out = session(fixed_gather_onnx).run(None, {**feed, "orig_sizes": orig_sizes.numpy()})
    scores, labels, boxes = (torch.from_numpy(x) for x in gather_out)
    logits_gs, boxes_gs = (torch.from_numpy(x) for x in session(dynamic_onnx).run(None, feed))
    num_select = tiny_detector.config.model.num_select
    for ref in (postprocess(logits_gs, boxes_gs, orig_sizes, num_select),  # level_sum in onnxruntime
                postprocess(*torch_outputs(tiny_detector, images, mask), orig_sizes, num_select)):  # PyTorch
        torch.testing.assert_close(scores, ref.scores, atol=1e-5, rtol=0)
        assert torch.equal(labels, ref.labels)
        torch.testing.assert_close(boxes, ref.boxes, atol=1e-2, rtol=1e-3)


def test_fp16_conversion_keeps_float32_io(fixed_gather_onnx: Path, sample_images: list[Path], one_thread):
    """--fp16 is a post-pass on the exported graph (weights and arithmetic in float16)."""
    from dinodet.deploy.export import _to_fp16

    model = _to_fp16(onnx.load(str(fixed_gather_onnx)))
    onnx.checker.check_model(model)
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    floats = [t.data_type for t in model.graph.initializer if t.data_type in float_types]
    assert floats.count(onnx.TensorProto.FLOAT16) > 0.9 * len(floats)
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types["images"] == io_types["scores"] == io_types["boxes"] == onnx.TensorProto.FLOAT
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    images, mask, orig_sizes = fixed_inputs(sample_images)
    feed = {"images": images.numpy(), "mask": mask.numpy(), "orig_sizes": orig_sizes.numpy()}
    scores, labels, boxes = ort.InferenceSession(model.SerializeToString(), options).run(None, feed)
    assert scores.shape == (2, 60) and boxes.shape == (2, 60, 4) and labels.dtype == "int64"
    assert (scores >= 0).all() and (scores <= 1).all() and torch.isfinite(torch.from_numpy(boxes)).all()


# ------------------------------------------------------------------------------------- predict


def test_predict_onnxruntime_backend_matches_torch(dynamic_onnx: Path, run_checkpoint: Path, image_dir: Path,
                                                   tmp_path: Path, one_thread):
    # no --size: each backend resizes by its file's defaults, which must agree (and EMA weights on both)
    common = [str(image_dir), "--threshold", "0", "--batch-size", "2"]
    assert main(["predict", *common, "--checkpoint", str(run_checkpoint), "--out", str(tmp_path / "torch")]) == 0
    assert main(["predict", *common, "--backend", "onnxruntime", "--model", str(dynamic_onnx),
                 "--out", str(tmp_path / "ort")]) == 0
    ref = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    got = json.loads((tmp_path / "ort" / "predictions.json").read_text())
    assert len({r["file_name"] for r in got}) == 3  # the three readable images of image_dir
    same_records(ref, got, "onnxruntime")
    annotated = [sorted(p.name for p in (tmp_path / d).glob("*.jpg")) for d in ("torch", "ort")]
    assert annotated[0] == annotated[1] and len(annotated[0]) == 3


def test_onnx_detector_with_fixed_shape_model(fixed_gather_onnx: Path, sample_images: list[Path], one_thread):
    """A fixed 2x128x160 model: images are padded to 128x160, the batch is filled up to 2."""
    detector = OnnxDetector(fixed_gather_onnx, size=96, max_size=128, num_threads=1)
    assert detector.fixed_batch == 2 and detector.fixed_hw == FIXED_HW and detector.with_postprocess
    preds = detector.predict(sample_images, threshold=0.0)  # 3 images: batches of 2 + 1
    assert len(preds) == 3 and all(len(p) == 60 for p in preds)
    assert [p.image_size for p in preds] == [(480, 640), (640, 512), (428, 640)]
    assert preds[0].class_names[0] == COCO_CLASSES[int(preds[0].labels[0])]
    with pytest.raises(ConfigError, match="at most 128x160"):
        OnnxDetector(fixed_gather_onnx, size=160, max_size=256, num_threads=1).predict(sample_images[0])


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("opset", ["12", "99"])
def test_cli_export_unknown_opset_is_one_line_error(tiny_checkpoint: Path, tmp_path: Path, opset: str,
                                                    capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--opset", opset]) == 2
    one_line_export_error(capsys, f"unsupported ONNX opset {opset}", f"{MIN_OPSET}..{MAX_OPSET}")
    assert not out.exists()


def test_export_takes_the_ops_backend_names_and_overrides_config_and_variable(tiny_detector: Detector,
                                                                           monkeypatch: pytest.MonkeyPatch):
    from dinodet.deploy.export import _msda_backend, default_msda, export_backend
    from dinodet.models.attention import MultiScaleDeformableAttention

    assert [export_backend(n) for n in ("pytorch", "grid_sample", "gather", "level_sum")] == [
        "pytorch", "pytorch", "gather", "level_sum"]
    with pytest.raises(ExportError, match=r"'triton' does not export \(choose from: gather, level_sum, pytorch, grid_sample\)"):
        export_backend("triton")
    # OpenVINO's embedding bag: the default of a fixed-shape IR, refused for a plain ONNX file or dynamic shapes
    assert default_msda("openvino") == export_backend("embedding_bag", "openvino") == "embedding_bag"
    assert default_msda() == default_msda("openvino", dynamic=True) == "level_sum"
    with pytest.raises(ExportError, match=r"'embedding_bag' exports for openvino only \(choose from: gather, level_sum"):
        export_backend("embedding_bag")
    with pytest.raises(ExportError, match="'embedding_bag' needs fixed shapes"):
        export_backend("embedding_bag", "openvino", dynamic=True)
    model = tiny_detector.model
    modules = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    before = [m.backend for m in modules]
    monkeypatch.setenv("DINODET_MSDA", "embedding_bag")
    with _msda_backend(model, "gather"):
        assert {m.backend for m in modules} == {"gather"}
    assert [m.backend for m in modules] == before  # the detector runs as it did


def test_cli_export_missing_checkpoint_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    one_line_export_error(capsys, "checkpoint not found", "nope.pt")


def test_api_rejects_bad_options(tiny_detector: Detector, tmp_path: Path):
    with pytest.raises(ExportError, match="unsupported ONNX opset 16"):
        to_onnx(tiny_detector, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ExportError, match="unknown MSDA variant"):
        to_onnx(tiny_detector, tmp_path / "m.onnx", msda="cuda")
    with pytest.raises(ExportError, match="MSDA backend 'embedding_bag' exports for openvino only"):
        to_onnx(tiny_detector, tmp_path / "m.onnx", msda="embedding_bag")
    with pytest.raises(ExportError, match="not allowed with dynamic"):
        to_onnx(tiny_detector, tmp_path / "m.onnx", dynamic=True, batch_size=2)
    with pytest.raises(ExportError, match=r"\.onnx"):
        to_onnx(tiny_detector, tmp_path / "m.pt")
    with pytest.raises(ExportError, match=r"input size must be two sides \(H W\) in 65..8192"):
        to_onnx(tiny_detector, tmp_path / "huge.onnx", batch_size=1, input_size=(100000, 100000))
    with pytest.raises(ExportError, match="max_size must be >= 65"):  # a 1x1 model that finds nothing
        to_onnx(tiny_detector, tmp_path / "m.onnx", max_size=1)
    with pytest.raises(ExportError, match="need size <= max_size, got size 100 and max_size 80"):
        to_onnx(tiny_detector, tmp_path / "m.onnx", size=100, max_size=80)
    assert not (tmp_path / "m.onnx").exists()


def test_predict_onnxruntime_errors_are_one_line(image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    image = str(image_dir / "000000000009.jpg")
    assert main(["predict", image, "--backend", "onnxruntime", "--out", str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, "needs --model")
    assert main(["predict", image, "--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, "ONNX model not found")
    plain = tmp_path / "plain.onnx"  # a valid ONNX file that is not a dinodet export
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi[:1], vi[1:])), str(plain))
    assert main(["predict", image, "--model", str(plain), "--out", str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, "not a dinodet ONNX export")
    model = onnx.load(str(plain))  # the format tag, but not the rest of the metadata
    onnx.helper.set_model_props(model, {"format": METADATA_FORMAT, "preset": "tiny", "class_names": "[oops"})
    onnx.save(model, str(plain))
    assert main(["predict", image, "--model", str(plain), "--out", str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, "invalid dinodet metadata")



@pytest.mark.parametrize("model_file, props, fragment", [
    # the case: a label map shorter than the class count (was an IndexError, or every image skipped)
    ("dynamic_onnx", {"class_names": json.dumps(["a", "b"])}, "2 class_names"),
    ("dynamic_onnx", {"category_ids": "[1, 2, 3]", "num_classes": "3"}, "classes of the logits output"),
    ("fixed_gather_onnx", {"class_names": json.dumps(["a"])}, "1 class_names"),  # labels: no class count in the shape
    ("dynamic_onnx", {"num_select": "0"}, "num_select must be >= 1"),
    ("dynamic_onnx", {"size": "100000"}, "size must be <= 8192"),
    ("dynamic_onnx", {"max_size": "0"}, "max_size must be >= 1"),
    ("dynamic_onnx", {"with_postprocess": "true"}, "needs the outputs scores, labels, boxes"),
    ("fixed_gather_onnx", {"with_postprocess": "false"}, "needs the outputs logits, boxes"),
    ("dynamic_onnx", {"with_postprocess": "1"}, "with_postprocess must be true or false, got 1"),
])
def test_onnx_metadata_that_does_not_fit_the_model_is_one_line(request: pytest.FixtureRequest, tmp_path: Path,
                                                                image_dir: Path, capsys: pytest.CaptureFixture[str],
                                                                model_file: str, props: dict, fragment: str):
    from dinodet.errors import CheckpointError

    model = onnx.load(str(request.getfixturevalue(model_file)))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError, match="invalid dinodet metadata"):
        OnnxDetector(path)
    assert main(["predict", str(image_dir / "000000000009.jpg"), "--model", str(path), "--out",
                 str(tmp_path / "o")]) == 2
    one_line_export_error(capsys, str(path), fragment)


# ----------------------------------------------------------------------------- dino_r50_4scale


@pytest.mark.slow
def test_r50_4scale_export_matches_pytorch(tmp_path: Path, one_thread):
    detector = Detector.from_random("dino_r50_4scale", seed=0)
    out = tmp_path / "r50.onnx"
    to_onnx(detector, out, msda="grid_sample", batch_size=1, input_size=(96, 128))
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["preset"] == "dino_r50_4scale"
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    mask[:, :, 120:] = True  # some padding
    images = images.masked_fill(mask[:, None], 0.0)
    logits, boxes, ref_logits, ref_boxes = outputs_for_one_selection(out, detector, images, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------- other backbones and 5 feature levels


def _swin_t_5scale() -> DINOConfig:
    """The dino_swinl_5scale layout on the small Swin-T body (same code path: windowed attention,
    patch merging, a stride-4 level and the extra 5th level), so the test stays quick."""
    cfg = get_preset("dino_swinl_5scale")
    cfg.model.backbone.name = "swin_t"
    cfg.model.backbone.window_size = 7
    cfg.model.backbone.use_checkpoint = False
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("make_config", [_swin_t_5scale, lambda: get_preset("dino_convnext_t_4scale")],
                         ids=["swin_t_5scale", "convnext_t_4scale"])
def test_other_backbones_export_matches_pytorch(make_config, tmp_path: Path, one_thread):
    config = make_config()
    torch.manual_seed(0)
    detector = Detector(DINO(config.model).eval(), config)
    out = tmp_path / "model.onnx"
    to_onnx(detector, out, msda="grid_sample", batch_size=1, input_size=(128, 160))
    images = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask[:, 100:, :] = True  # padding at the bottom
    images = images.masked_fill(mask[:, None], 0.0)
    logits, boxes, ref_logits, ref_boxes = outputs_for_one_selection(out, detector, images, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-5, rtol=1e-4)


# a checkpoint's own label map reaches the ONNX metadata and onnxruntime predictions
# --fp16 keeps the detections of the float32 graph (not only the I/O types)
def test_export_keeps_the_label_map_and_fp16_keeps_the_detections(tmp_path, tiny_detector, sample_images, one_thread):
    from dinodet.deploy.export import _to_fp16, to_onnx
    from dinodet.inference.detector import Detector, preprocess_batch
    from dinodet.inference.onnx_runtime import OnnxDetector

    names, ids = [f"thing{k}" for k in range(91)], [1000 + k for k in range(91)]
    det = Detector(tiny_detector.model, tiny_detector.config, names, ids, size=96, max_size=128)
    out = tmp_path / "m.onnx"
    to_onnx(det, out, msda="gather", with_postprocess=True, batch_size=1, input_size=(128, 128))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["category_ids"]) == ids and json.loads(meta["class_names"]) == names
    (pred,) = OnnxDetector(out, num_threads=1).predict(sample_images[0], threshold=0.0)
    assert pred.category_ids.tolist() == [1000 + k for k in pred.labels.tolist()]
    assert pred.class_names == [f"thing{k}" for k in pred.labels.tolist()]

    images, mask, sizes = preprocess_batch(sample_images[:1], 96, 128)
    pad = (0, 128 - images.shape[-1], 0, 128 - images.shape[-2])
    feed = {"images": torch.nn.functional.pad(images, pad).numpy(),
            "mask": torch.nn.functional.pad(mask, pad, value=True).numpy(), "orig_sizes": sizes.numpy()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    s32, _, _ = ort.InferenceSession(str(out), opts).run(None, feed)
    s16, _, _ = ort.InferenceSession(_to_fp16(onnx.load(str(out))).SerializeToString(), opts).run(None, feed)
    # half precision moves the scores by ~1e-3 (measured); a broken conversion moves them far more
    torch.testing.assert_close(torch.from_numpy(s16[0, :10]).float(), torch.from_numpy(s32[0, :10]), atol=1e-2, rtol=0)
