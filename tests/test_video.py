"""Video input (``dinodet predict VIDEO``, ``Detector.predict_stream``) and supervision interop."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.cli import main
from dinodet.errors import ConfigError
from dinodet.inference.detector import Detector, Prediction

av = pytest.importorskip("av", reason="video tests need PyAV: pip install 'dinodet[video]'")

PHOTOS = Path(__file__).parent / "data" / "coco128_mini" / "images" / "train2017"
FRAMES, WIDTH, HEIGHT, FPS = 8, 320, 240, 10
TINY = ["--random-weights", "--preset", "tiny", "--size", "64", "--max-size", "96", "--threshold", "0"]


def make_video(path: Path, frames: int = FRAMES) -> Path:
    """An H.264 video of the vendored photos (moov atom first, so a truncated copy still opens)."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    container = av.open(str(path), "w", options={"movflags": "faststart"} if path.suffix == ".mp4" else {})
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    for i in range(frames):
        image = Image.open(photos[i % len(photos)]).convert("RGB").resize((WIDTH, HEIGHT))
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_video_writes_annotated_mp4_and_jsonl(video: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(video), *TINY, "--out", str(out)]) == 0
    frames = decoded(out / "clip.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    with av.open(str(out / "clip.mp4")) as container:
        assert container.streams.video[0].average_rate == FPS
    lines = jsonl(out / "clip.jsonl")
    assert [x["frame"] for x in lines] == list(range(FRAMES))
    assert [x["time_s"] for x in lines] == pytest.approx([i / FPS for i in range(FRAMES)])
    det = lines[0]["detections"][0]
    assert set(det) == {"bbox", "score", "category_id", "class_name"} and len(det["bbox"]) == 4
    assert all(d["score"] > 0 for x in lines for d in x["detections"])
    assert f"in {FRAMES} frame(s)" in capsys.readouterr().out
    # a second run replaces its own files; a user's NAME.mp4 is never overwritten
    assert main(["predict", str(video), *TINY, "--out", str(out), "--max-frames", "1"]) == 0
    assert len(jsonl(out / "clip.jsonl")) == 1
    user = tmp_path / "user"
    user.mkdir()
    (user / "clip.mp4").write_bytes(b"mine")
    assert main(["predict", str(video), *TINY, "--out", str(user)]) == 2
    assert (user / "clip.mp4").read_bytes() == b"mine" and "clip.mp4" in capsys.readouterr().err


def test_truncated_video_keeps_decodable_frames(video: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.mp4"
    data = video.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    out = tmp_path / "out"
    assert main(["predict", str(cut), *TINY, "--out", str(out), "--no-save-images"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "truncated" in ln]
    assert len(warnings) == 1 and "cut.mp4" in warnings[0]
    assert 0 < len(jsonl(out / "cut.jsonl")) < FRAMES and not (out / "cut.mp4").exists()


def test_vid_stride_and_max_frames(video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(video), *TINY, "--out", str(out), "--vid-stride", "3", "--no-save-images"]) == 0
    assert [x["frame"] for x in jsonl(out / "clip.jsonl")] == [0, 3, 6]
    assert main(["predict", str(video), *TINY, "--out", str(out), "--vid-stride", "2", "--max-frames", "2"]) == 0
    assert [x["frame"] for x in jsonl(out / "clip.jsonl")] == [0, 2]
    assert len(decoded(out / "clip.mp4")) == 2


def test_images_and_video_in_one_call(video: Path, tmp_path: Path) -> None:
    image = sorted(PHOTOS.glob("*.jpg"))[0]
    out = tmp_path / "out"
    assert main(["predict", str(image), str(video), *TINY, "--out", str(out), "--max-frames", "2"]) == 0
    assert (out / image.name).exists() and (out / "predictions.json").exists()
    assert len(jsonl(out / "clip.jsonl")) == 2


def test_predict_stream_matches_predict_on_frames(video: Path) -> None:
    detector = Detector.from_random("tiny", size=64, max_size=96)
    results = list(detector.predict_stream(video, threshold=0.0, max_frames=3, batch_size=2))
    assert [r.frame for r in results] == [0, 1, 2]
    direct = detector.predict([r.image for r in results], threshold=0.0)
    for r, p in zip(results, direct):
        assert torch.equal(r.prediction.boxes, p.boxes) and r.prediction.image_size == (HEIGHT, WIDTH)


def test_missing_extra_is_one_line(video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    assert main(["predict", str(video), *TINY, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dinodet: error:") and "pip install 'dinodet[video]'" in err[-1]
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ConfigError, match=r"dinodet\[video\]"):
        Prediction(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.int64), [], (1, 1)).to_supervision()


def test_to_supervision_round_trip() -> None:
    pytest.importorskip("supervision", reason="needs supervision: pip install 'dinodet[video]'")
    pred = Prediction(boxes=torch.tensor([[1.5, 2.25, 30.0, 40.125], [0.0, 0.0, 5.0, 6.0]]),
                      scores=torch.tensor([0.9, 0.31]), labels=torch.tensor([1, 17]),
                      category_ids=torch.tensor([1, 18]), class_names=["person", "dog"], image_size=(50, 60))
    det = pred.to_supervision()
    assert np.array_equal(det.xyxy, pred.boxes.numpy()) and np.array_equal(det.confidence, pred.scores.numpy())
    assert det.class_id.tolist() == [1, 17] and det["category_id"].tolist() == [1, 18]
    assert det["class_name"].tolist() == ["person", "dog"] and len(det) == 2
