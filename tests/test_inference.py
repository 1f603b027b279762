"""Detector on the tiny preset with random weights: input forms, coordinates, label map, loading."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.boxes import box_cxcywh_to_xyxy
from dinodet.checkpoint import CheckpointError
from dinodet.config import ConfigError
from dinodet.data.coco_classes import COCO_CLASSES
from dinodet.data.images import ImageLoadError, load_image
from dinodet.data.transforms import eval_transform, pad_batch
from dinodet.inference.detector import Detector, Prediction, default_label_map


def _as_uint8_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def test_prediction_fields(sample_predictions: list[Prediction], tiny_detector: Detector):
    assert [p.image_size for p in sample_predictions] == [(480, 640), (640, 512), (428, 640)]
    pred = sample_predictions[0]
    n = len(pred)
    assert n == tiny_detector.config.model.num_select  # threshold 0 keeps every top-k detection
    assert pred.boxes.shape == (n, 4) and pred.boxes.dtype == torch.float32
    assert pred.scores.shape == (n,) and pred.labels.dtype == torch.int64
    assert torch.all(pred.scores[:-1] >= pred.scores[1:])  # sorted
    # 91-class model: class index == COCO category id, names from the COCO table
    assert torch.equal(pred.category_ids, pred.labels)
    assert pred.class_names == [COCO_CLASSES[k] for k in pred.labels.tolist()]


def test_pil_and_tensor_inputs_agree_with_paths(
    tiny_detector: Detector, sample_images: list[Path], sample_predictions: list[Prediction]
):
    by_path = sample_predictions[0]
    pil = load_image(sample_images[0])
    by_pil, by_u8, by_float = tiny_detector.predict(
        [pil, _as_uint8_tensor(pil), _as_uint8_tensor(pil).float() / 255], threshold=0.0
    )
    assert by_pil.image_size == by_u8.image_size == by_float.image_size == (480, 640)
    torch.testing.assert_close(by_pil.boxes, by_path.boxes)
    torch.testing.assert_close(by_u8.boxes, by_path.boxes)  # uint8 tensors take the PIL resize path
    # float tensors are resized as tensors: slightly different pixels, same picture
    assert (by_float.scores[:5] - by_path.scores[:5]).abs().max() < 0.05


def test_pil_images_of_any_mode(tiny_detector: Detector, sample_images: list[Path]):
    rgb = load_image(sample_images[0])
    by_rgb, by_rgba = tiny_detector.predict([rgb, rgb.convert("RGBA")], threshold=0.0)
    torch.testing.assert_close(by_rgba.boxes, by_rgb.boxes)  # the alpha channel is dropped
    (by_gray,) = tiny_detector.predict(rgb.convert("L"), threshold=0.0)
    assert by_gray.image_size == (480, 640) and len(by_gray) > 0


def test_boxes_are_in_original_image_pixels(
    tiny_detector: Detector, sample_images: list[Path], sample_predictions: list[Prediction]
):
    """Every predicted box is a model box (relative to the resized image) times the ORIGINAL size."""
    image = load_image(sample_images[2])  # 640x428, much smaller once resized for the model
    w, h = image.size
    pred = sample_predictions[2]

    batch, mask = pad_batch([eval_transform(image, tiny_detector.size, tiny_detector.max_size)])
    with torch.inference_mode():
        rel = box_cxcywh_to_xyxy(tiny_detector.model(batch, mask).pred_boxes[0])  # [Q, 4] in 0..1
    expected = rel * torch.tensor([w, h, w, h])
    error = (pred.boxes[:, None, :] - expected[None, :, :]).abs().amax(dim=-1)  # [N, Q]
    assert error.min(dim=1).values.max() < 1e-3
    centres = (pred.boxes[:, :2] + pred.boxes[:, 2:]) / 2
    assert (centres >= 0).all() and (centres[:, 0] <= w).all() and (centres[:, 1] <= h).all()


def test_threshold_and_batched_tensor_input(
    tiny_detector: Detector, sample_images: list[Path], sample_predictions: list[Prediction]
):
    cut = float(sample_predictions[0].scores[10])
    stacked = torch.stack([_as_uint8_tensor(load_image(sample_images[0]))] * 2)  # [2, 3, H, W]
    preds = tiny_detector.predict(stacked, threshold=cut, batch_size=2)
    assert len(preds) == 2
    for p in preds:
        assert 0 < len(p) <= 12 and bool((p.scores > cut).all())


def test_invalid_arguments(tiny_detector: Detector, tmp_path: Path):
    with pytest.raises(ValueError, match="threshold"):
        tiny_detector.predict(torch.zeros(3, 8, 8), threshold=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_detector.predict(torch.zeros(3, 8, 8), batch_size=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="bad.png"):
        tiny_detector.predict(bad)


def test_custom_label_map(tiny_detector: Detector):
    names = [f"thing{k}" for k in range(91)]
    ids = [1000 + k for k in range(91)]
    det = Detector(tiny_detector.model, tiny_detector.config, names, ids, size=64, max_size=96)
    (pred,) = det.predict(torch.rand(3, 50, 70), threshold=0.0)
    assert pred.category_ids.tolist() == [1000 + k for k in pred.labels.tolist()]
    assert pred.class_names == [f"thing{k}" for k in pred.labels.tolist()]
    with pytest.raises(ConfigError, match="91 classes"):
        Detector(tiny_detector.model, tiny_detector.config, class_names=["a", "b"])


def test_default_label_map():
    assert default_label_map(91, None, None) == (list(COCO_CLASSES), list(range(91)))
    assert default_label_map(2, None, [5, 9]) == (["class 5", "class 9"], [5, 9])
    assert default_label_map(2, ["a", "b"], None) == (["a", "b"], [0, 1])


def test_from_checkpoint_round_trip(tiny_detector: Detector, tiny_checkpoint: Path):
    loaded = Detector.from_checkpoint(tiny_checkpoint, preset="tiny")
    assert loaded.config == tiny_detector.config and not loaded.model.training
    a, b = tiny_detector.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_random_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = Detector.from_random("tiny", seed=1).model.state_dict()
    b = Detector.from_random("tiny", seed=1).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loading_errors(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        Detector.from_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="tiny"):
        Detector.from_checkpoint(tiny_checkpoint, preset="dino_r50_4scale")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        Detector.from_random("nope")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Detector.from_random("tiny", device="cuda")
    with pytest.raises(ConfigError, match="invalid device"):
        Detector.from_random("tiny", device="gpu0")


def test_modes_and_config_resize_defaults(tiny_detector: Detector, sample_images: list[Path]):
    default = Detector.from_random("tiny", seed=0)
    assert (default.size, default.max_size) == (default.config.data.eval_size, default.config.data.max_size)
    assert default.mode == "exact"
    size = dict(size=tiny_detector.size, max_size=tiny_detector.max_size)
    ref = Detector.from_random("tiny", seed=0, mode="reference", **size).predict(sample_images[:2], threshold=0.0)
    fast = Detector.from_random("tiny", seed=0, mode="channels_last", **size).predict(sample_images[:2], threshold=0.0)
    for a, b in zip(ref, fast):  # float32 either way: the same detections up to rounding
        assert torch.allclose(a.scores, b.scores, atol=1e-4) and torch.allclose(a.boxes, b.boxes, atol=1e-2)
    with pytest.raises(ConfigError, match="not available on cpu"):
        Detector.from_random("tiny", mode="fp16")
    with pytest.raises(ConfigError, match="unknown inference mode 'fastest'"):
        Detector.from_random("tiny", mode="fastest")


def test_from_checkpoint_uses_the_ema_weights_of_a_training_checkpoint(tiny_detector: Detector, tmp_path: Path):
    from dinodet.checkpoint import save_checkpoint

    raw = tiny_detector.model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    path = save_checkpoint(tmp_path / "checkpoint.pt", tiny_detector.model, tiny_detector.config,
                           extra={"ema": {"decay": 0.99, "updates": 3, "module": ema}})
    loaded = Detector.from_checkpoint(path).model.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in raw)


# images of different sizes in one Detector.predict batch each keep their own frame
def test_batch_size_does_not_change_the_detections(tiny_detector, sample_images, sample_predictions):
    """Images of other sizes run separately (unpadded); same-size ones together: any batch size
    gives the batch-1 detections (up to float noise of batched matrix products)."""
    assert len({Image.open(p).size for p in sample_images}) > 1  # a padded batch would differ
    inputs = [*sample_images, sample_images[0]]  # the last shares the first's size: one forward pass of 2
    batched = tiny_detector.predict(inputs, threshold=0.0, batch_size=len(inputs))
    for b, one in zip(batched, [*sample_predictions, sample_predictions[0]]):
        assert b.image_size == one.image_size
        torch.testing.assert_close(b.scores, one.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.boxes, one.boxes, atol=1e-3, rtol=0)
        assert torch.equal(b.labels, one.labels)


def test_numpy_images_and_wrong_inputs(tiny_detector, sample_images, sample_predictions):
    array = np.asarray(Image.open(sample_images[0]).convert("RGB"))
    (pred,) = tiny_detector.predict(array, threshold=0.0)
    torch.testing.assert_close(pred.scores, sample_predictions[0].scores, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="values in 0..1, got 0..255"):
        tiny_detector.predict(torch.from_numpy(array.copy()).permute(2, 0, 1).float())  # forgot / 255
    with pytest.raises(ValueError, match="values in 0..1, got nan"):
        tiny_detector.predict(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="numpy image must be uint8"):
        tiny_detector.predict(array.astype(np.float32))
    with pytest.raises(ValueError, match="unsupported image type int"):
        tiny_detector.predict([3])


# the seed of from_random matters (and the same seed repeats)
def test_from_random_seed_changes_the_weights():
    from dinodet.inference.detector import Detector

    a = Detector.from_random("tiny", seed=1).model.state_dict()
    b = Detector.from_random("tiny", seed=2).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_device_auto_picks_cuda_when_there_is_one(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    import logging

    from dinodet.cli import build_parser
    from dinodet.inference.detector import resolve_device

    with caplog.at_level(logging.DEBUG, logger="dinodet"):
        if not torch.cuda.is_available():
            assert resolve_device("auto") == torch.device("cpu") and "using cpu" in caplog.text
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
        assert resolve_device("auto") == torch.device("cuda")
    assert "device auto: using cuda (Test GPU)" in caplog.text
    parser = build_parser()
    for command in (["predict", "x.jpg", "--out", "o"], ["eval", "--checkpoint", "c.pt", "--data", "d"],
                    ["train", "--data", "d", "--out", "r"], ["bench"]):
        assert parser.parse_args(command).device == "auto", command
