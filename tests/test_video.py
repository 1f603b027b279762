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


def make_video(path: Path, frames: int = FRAMES, size: tuple[int, int] = (WIDTH, HEIGHT), still: bool = False) -> Path:
    """An H.264 video (``size`` = (width, height)) of the vendored photos, a new photo each frame or
    with ``still`` the first one throughout (moov atom first, so a truncated copy still opens)."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    container = av.open(str(path), "w", options={"movflags": "faststart"} if path.suffix == ".mp4" else {})
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
    if still and stream.codec_context.name == "libx264":
        stream.options = {"qp": "0"}  # lossless: every frame decodes to the same pixels
    for i in range(frames):
        image = Image.open(photos[0 if still else i % len(photos)]).convert("RGB").resize(size)
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


# ------------------------------------------------------------------------------------------ tracking


def test_track_gives_every_detection_a_track_id(tmp_path: Path, tiny_checkpoint: Path, one_thread: None) -> None:
    """The issue's bar: a 12-frame 640x480 video of real photos through `dinodet predict --track`."""
    pytest.importorskip("trackers", reason="tracking needs trackers: pip install 'dinodet[video]'")
    video = make_video(tmp_path / "street.mp4", frames=12, size=(640, 480))
    out = tmp_path / "out"
    rc = main(["predict", str(video), "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--track",
               "--size", "64", "--max-size", "96", "--threshold", "0"])
    assert rc == 0
    frames = decoded(out / "street.mp4")
    assert len(frames) == 12 and frames[0].shape == (480, 640, 3)
    lines = jsonl(out / "street.jsonl")
    assert [x["frame"] for x in lines] == list(range(12))
    detections = [d for x in lines for d in x["detections"]]
    assert detections and all(set(d) == {"bbox", "score", "category_id", "class_name", "track_id"} for d in detections)
    # an id on every detection, the first frame's included, and never two objects with one id in a frame
    assert all(isinstance(d["track_id"], int) and d["track_id"] >= 0 for d in detections)
    assert lines[0]["detections"]
    assert all(len({d["track_id"] for d in x["detections"]}) == len(x["detections"]) for x in lines)


def test_track_ids_persist_on_a_still_scene(tmp_path: Path, one_thread: None) -> None:
    """Identical frames give identical detections, so every object must keep its id from frame 1 on."""
    pytest.importorskip("trackers", reason="tracking needs trackers: pip install 'dinodet[video]'")
    video = make_video(tmp_path / "still.mp4", frames=6, still=True)
    detector = Detector.from_random("tiny", size=64, max_size=96, one_label_per_query=True)  # one box per query
    results = list(detector.predict_stream(video, threshold=0.0, track=True))
    ids = [r.prediction.track_ids.tolist() for r in results]
    assert len(ids) == 6 and ids[0] and min(ids[0]) >= 0  # ids from the first frame on
    assert len(set(ids[0])) == len(ids[0])  # one id per object
    assert all(frame_ids == ids[0] for frame_ids in ids[1:])
    untracked = next(iter(detector.predict_stream(video, threshold=0.0, max_frames=1))).prediction
    assert untracked.track_ids is None


def test_track_without_trackers_is_one_line(video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "trackers", None)
    assert main(["predict", str(video), *TINY, "--out", str(tmp_path / "out"), "--track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dinodet: error: tracking (--track) needs the 'trackers' package")
    assert "pip install 'dinodet[video]'" in err[-1] and not (tmp_path / "out").exists()


def test_folder_of_videos_and_images(video: Path, tmp_path: Path, one_thread: None) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(video.read_bytes())
    image = sorted(PHOTOS.glob("*.jpg"))[0]
    (folder / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    assert main(["predict", str(folder), *TINY, "--out", str(out), "--max-frames", "2", "--no-save-images"]) == 0
    assert len(jsonl(out / "clip.jsonl")) == 2
    assert [r["file_name"] for r in json.loads((out / "predictions.json").read_text())][:1] == [image.name]
    only_videos = tmp_path / "videos"
    only_videos.mkdir()
    (only_videos / "a.mp4").write_bytes(video.read_bytes())
    assert main(["predict", str(only_videos), *TINY, "--out", str(out), "--max-frames", "1", "--no-save-images"]) == 0
    assert len(jsonl(out / "a.jsonl")) == 1


def moving(frame: int, scores: tuple[float, float], extra: list[tuple[list[float], float]] = ()) -> Prediction:
    """Two 40x40 boxes moving right 6 px a frame (A at y=20, B at y=200), plus ``extra`` (box, score)."""
    boxes = [[10 + 6 * frame, 20, 50 + 6 * frame, 60], [300 - 6 * frame, 200, 340 - 6 * frame, 240]]
    items = sorted([*zip(boxes, scores), *extra], key=lambda x: -x[1])
    n = len(items)
    return Prediction(boxes=torch.tensor([b for b, _ in items]), scores=torch.tensor([s for _, s in items]),
                      labels=torch.zeros(n, dtype=torch.int64), category_ids=torch.ones(n, dtype=torch.int64),
                      class_names=["thing"] * n, image_size=(480, 640))


def test_tracker_follows_boxes_and_keeps_weak_ones_on_their_track() -> None:
    pytest.importorskip("trackers", reason="tracking needs trackers: pip install 'dinodet[video]'")
    from dinodet.inference.tracking import Tracker

    tracker = Tracker(threshold=0.5, fps=10)
    ids = {}
    for frame in range(6):
        # the score order flips every frame: ids must follow the boxes, not the ranks
        scores = (0.9, 0.8) if frame % 2 else (0.8, 0.9)
        if frame == 4:
            scores = (0.2, 0.9)  # A dips below the threshold: ByteTrack's second stage keeps it on its track
        stranger = [([500.0, 400.0, 540.0, 440.0], 0.2)] if frame == 4 else []  # weak and on no track: dropped
        pred = tracker.update(moving(frame, scores, stranger))
        by_row = {round(b[1]): t for b, t in zip(pred.boxes.tolist(), pred.track_ids.tolist())}
        # ids from the first frame on, kept by each box
        assert len(pred) == 2 and set(by_row) == {20, 200} and min(by_row.values()) >= 0
        ids.setdefault("A", by_row[20])
        ids.setdefault("B", by_row[200])
        assert (by_row[20], by_row[200]) == (ids["A"], ids["B"]) and ids["A"] != ids["B"]
        assert pred.scores.tolist() == sorted(pred.scores.tolist(), reverse=True)
