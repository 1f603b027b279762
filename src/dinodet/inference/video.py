"""Video files, cameras and network streams: decoding with PyAV, per-frame prediction, and the
annotated video + JSONL that ``dinodet predict VIDEO`` writes.

PyAV (``pip install 'dinodet[video]'``) bundles FFmpeg, so no system ffmpeg is needed; files, a
webcam index and ``rtsp://`` / ``http(s)://`` URLs all go through ``av.open``.  A source that
fails mid-way (a truncated file, a dropped stream) is a logged warning: the frames decoded so far
are kept and the run ends cleanly.  The JSONL is written line by line and the MP4 fragmented, so
what was written before a crash or Ctrl-C stays readable.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageLoadError
from .extras import require

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
STREAM_TIMEOUT_S = 10.0  # a network stream silent this long is taken as dropped (instead of hanging)
DEFAULT_FPS = Fraction(30)  # a stream that does not say its rate (some webcams, MJPEG over HTTP)
# fragmented MP4: every fragment is playable on its own, so a crash keeps what was written
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov"}


def is_video_source(source: str | Path) -> bool:
    """A video file (by extension), a stream URL or a webcam index ("0")."""
    text = str(source)
    return text.isdigit() or text.lower().startswith(STREAM_SCHEMES) or Path(text).suffix.lower() in VIDEO_EXTENSIONS


def is_file_source(source: str | Path) -> bool:
    """A video file rather than a camera or a URL (only files can be checked before the run)."""
    text = str(source)
    return not (text.isdigit() or text.lower().startswith(STREAM_SCHEMES))


def source_stem(source: str | Path) -> str:
    """The base name of a source's outputs: a file's stem, ``webcam0``, or a URL's last path part."""
    text = str(source)
    if text.isdigit():
        return f"webcam{text}"
    if text.lower().startswith(STREAM_SCHEMES):
        path = text.split("://", 1)[1].split("?", 1)[0].rstrip("/")
        last = path.rsplit("/", 1)[-1] if "/" in path else path.replace(":", "_")
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(last).stem or last) or "stream"
    return Path(text).stem


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the source, its time and its pixels (uint8 [H, W, 3] RGB)."""

    index: int
    time_s: float
    image: np.ndarray


@dataclass(frozen=True)
class FrameResult:
    """One processed frame: index in the source, time in seconds, pixels (RGB) and detections."""

    frame: int
    time_s: float
    image: np.ndarray
    prediction: Any  # a detector.Prediction (not imported here: detector.py imports this module)


class Predictor(Protocol):
    """What predicting on frames needs of a detector (``Detector``, ``OnnxDetector``)."""

    def predict(self, images: Sequence[np.ndarray], threshold: float = ..., batch_size: int = ...) -> list[Any]: ...


class VideoReader:
    """Decoded RGB frames of one source (every ``vid_stride``-th, at most ``max_frames``).

    Attributes known once open: ``fps`` (the source's frame rate) and ``frames`` (how many it says it
    has; None for streams and some containers).

    Raises:
        ConfigError: PyAV missing, or a webcam index on a platform without a known camera API.
        ImageLoadError: the source cannot be opened or has no video stream.
    """

    def __init__(self, source: str | Path, vid_stride: int = 1, max_frames: int | None = None):
        if vid_stride < 1:
            raise ConfigError(f"vid_stride must be >= 1, got {vid_stride}")
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {max_frames}")
        self.av = require("av")
        self.source, self.vid_stride, self.max_frames = str(source), vid_stride, max_frames
        self.container = _open(self.av, self.source)
        if not self.container.streams.video:
            self.container.close()
            raise ImageLoadError(f"'{self.source}' has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame-parallel decoding: decoding must not dominate the run
        self.fps: Fraction = self.stream.average_rate or self.stream.guessed_rate or DEFAULT_FPS
        self.frames: int | None = self.stream.frames or None
        # what the header says; for a truncated file (no frame count in Matroska) the only hint
        self.duration_s: float | None = self.container.duration / 1e6 if self.container.duration else None

    @property
    def expected(self) -> int | None:
        """How many frames iterating gives, when the source says how long it is."""
        n = None if self.frames is None else -(-self.frames // self.vid_stride)
        return self.max_frames if n is None else min(n, self.max_frames or n)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def __iter__(self) -> Iterator[Frame]:
        decoded = given = 0
        try:
            for frame in self.container.decode(self.stream):
                decoded += 1
                if (decoded - 1) % self.vid_stride:
                    continue
                time_s = float(frame.time) if frame.time is not None else (decoded - 1) / float(self.fps)
                yield Frame(decoded - 1, time_s, frame.to_ndarray(format="rgb24"))
                given += 1
                if self.max_frames is not None and given >= self.max_frames:
                    return
        except (self.av.FFmpegError, OSError) as e:  # a dropped stream, a cut or corrupt file
            log.warning("'%s' stopped after %d frame(s) (%s); the frames decoded so far are kept", self.source,
                        decoded, str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
            return
        if self.frames is not None and decoded < self.frames:  # a cut file can end without an error
            log.warning("'%s' ended after %d of its %d frames (a truncated file?); the frames decoded so far are "
                        "kept", self.source, decoded, self.frames)
        elif self.frames is None and self.duration_s and decoded < self.duration_s * float(self.fps) - 1.5:
            log.warning("'%s' ended after %d frame(s), %.2f s of its %.2f s (a truncated file?); the frames decoded "
                        "so far are kept", self.source, decoded, decoded / float(self.fps), self.duration_s)


def _open(av: ModuleType, source: str) -> Any:
    """``av.open`` for a file, a URL (with a timeout, so a dropped stream ends) or a webcam index."""
    try:
        if source.isdigit():
            camera = {"linux": ("v4l2", f"/dev/video{source}"), "darwin": ("avfoundation", source)}
            if sys.platform not in camera:
                raise ConfigError(f"a webcam index works on Linux and macOS; on {sys.platform} give the camera's URL")
            fmt, name = camera[sys.platform]
            return av.open(name, format=fmt)
        if source.lower().startswith(STREAM_SCHEMES):
            return av.open(source, timeout=STREAM_TIMEOUT_S)
        if not Path(source).is_file():
            raise ImageLoadError(f"video file '{source}' not found")
        return av.open(source)
    except (av.FFmpegError, OSError) as e:
        raise ImageLoadError(f"cannot open video '{source}': {str(e).splitlines()[0] if str(e) else e}") from None


def predict_frames(detector: Predictor, reader: VideoReader, threshold: float = 0.3,
                   batch_size: int = 1, track: bool = False) -> Iterator[FrameResult]:
    """Detections of ``reader``'s frames, ``batch_size`` frames per forward pass, in order; with
    ``track`` each Prediction carries ByteTrack ``track_ids`` (see ``tracking.Tracker``)."""
    tracker = None
    if track:
        from .tracking import Tracker, detection_threshold

        tracker = Tracker(threshold, reader.fps / reader.vid_stride)
        threshold = detection_threshold(threshold)
    frames = iter(reader)
    while True:
        chunk = [f for _, f in zip(range(batch_size), frames)]
        if not chunk:
            return
        preds = detector.predict([f.image for f in chunk], threshold=threshold, batch_size=len(chunk))
        for f, pred in zip(chunk, preds):
            yield FrameResult(f.index, f.time_s, f.image, pred if tracker is None else tracker.update(pred))


def predict_stream(detector: Predictor, source: str | Path, threshold: float = 0.3, vid_stride: int = 1,
                   max_frames: int | None = None, batch_size: int = 1, track: bool = False) -> Iterator[FrameResult]:
    """Per-frame detections of a video file, a webcam index or a stream URL, as they are decoded
    (with ``track``: ByteTrack ids in ``prediction.track_ids``).  The source is closed when the
    generator ends or is closed (a ``break`` in the caller's loop)."""
    with VideoReader(source, vid_stride, max_frames) as reader:
        yield from predict_frames(detector, reader, threshold, batch_size, track)


def jsonl_line(result: FrameResult) -> str:
    """One JSONL line: ``{"frame", "time_s", "detections": [{"bbox": [x, y, w, h], "score",
    "category_id", "class_name"[, "track_id"]}]}`` (pixels and score rounded as in predictions.json;
    ``track_id`` with tracking: an int from the object's first frame on; null only if the tracker gave none)."""
    pred = result.prediction
    tracks = [None] * len(pred) if pred.track_ids is None else pred.track_ids.tolist()
    detections = [
        {"bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(score, 5),
         "category_id": int(cat), "class_name": name,
         **({} if pred.track_ids is None else {"track_id": tid if tid >= 0 else None})}
        for (x0, y0, x1, y1), score, cat, name, tid in zip(pred.boxes.tolist(), pred.scores.tolist(),
                                                           pred.category_ids.tolist(), pred.class_names, tracks)
    ]
    return json.dumps({"frame": result.frame, "time_s": round(result.time_s, 6), "detections": detections})


def captions(pred: Any) -> list[str]:
    """What a drawn box says: the class name, after ``#id`` for a tracked detection."""
    if pred.track_ids is None:
        return list(pred.class_names)
    return [f"#{tid} {name}" if tid >= 0 else name for tid, name in zip(pred.track_ids.tolist(), pred.class_names)]


X264_PRESET = "ultrafast"


class AnnotatedVideoWriter:
    """An MP4 (H.264 with libx264 when PyAV's FFmpeg has it, else MPEG-4) of RGB frames, opened on the
    first frame (its size is the video's).  Fragmented, so what was written before a crash plays."""

    def __init__(self, path: Path, fps: Fraction):
        self.av = require("av")
        self.path, self.fps = path, fps
        self.container: Any = None
        self.stream: Any = None

    def write(self, image: np.ndarray) -> None:
        if self.container is None:
            self._open(image.shape[1], image.shape[0])
        h, w = self.stream.height, self.stream.width
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def _open(self, width: int, height: int) -> None:
        codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
        if width % 2 or height % 2:
            log.warning("'%s': the video is %dx%d, but %s in yuv420p needs even sizes; the last pixel row/column "
                        "is left out of the annotated video", self.path.name, width, height, codec)
        self.container = self.av.open(str(self.path), "w", format="mp4", options=MP4_OPTIONS)
        self.stream = self.container.add_stream(codec, rate=self.fps)
        if codec == "libx264":
            # x264's default preset ("medium") costs ~32 ms a 640x480 frame on 2 cores, 15% of a tiny-model
            # frame, where writing a JPEG costs ~2 ms; "ultrafast" ~4 ms, for a file ~25% larger
            # (benchmarks/video_throughput.py)
            # one x264 thread: its own pool would compete with the model's threads for the cores (measured: 1.05x
            # the JPEG path's cost per frame with one thread, 1.11x with x264's default thread count)
            self.stream.options = {"preset": X264_PRESET, "threads": "1"}
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"

    def close(self) -> None:
        """Flush the encoder and finish the file (also after an error or Ctrl-C)."""
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None


@dataclass(frozen=True)
class VideoSummary:
    """What one video source gave: ``frames`` processed, ``detections`` in them, and the files."""

    source: str
    frames: int
    detections: int
    jsonl: Path
    video: Path | None


def predict_video_to_folder(detector: Predictor, source: str | Path, out_dir: Path, stem: str, *,
                            threshold: float = 0.3, vid_stride: int = 1, max_frames: int | None = None,
                            batch_size: int = 1, save_video: bool = True, progress: bool = True,
                            track: bool = False, on_frame: Callable[[FrameResult], None] | None = None,
                            ) -> VideoSummary:
    """Detect objects in every processed frame of ``source``; write ``out_dir/<stem>.jsonl`` (one line
    per frame, see ``jsonl_line``) and, with ``save_video``, ``out_dir/<stem>.mp4`` (detections drawn,
    ``#id`` before the class with ``track``; the source's size, and its frame rate divided by
    ``vid_stride``).  Both are complete up to the last frame processed when the source fails, the run
    crashes or is interrupted (Ctrl-C, re-raised after the files are closed).  ``on_frame`` is called
    with each frame's result (other outputs, e.g. ``exports.DetectionExports``).  Checking that the
    names are free is the caller's job (``predict_to_folder``).

    Raises:
        ImageLoadError: the source cannot be opened.
    """
    from tqdm import tqdm

    from ..visualize import draw_detections

    jsonl = out_dir / f"{stem}.jsonl"
    video = out_dir / f"{stem}.mp4" if save_video else None
    frames = detections = 0
    with VideoReader(source, vid_stride, max_frames) as reader:
        writer = AnnotatedVideoWriter(video, reader.fps / vid_stride) if video is not None else None
        try:
            with jsonl.open("w", encoding="utf-8") as lines, \
                    tqdm(total=reader.expected, unit="frame", disable=not progress, file=sys.stderr) as bar:
                for result in predict_frames(detector, reader, threshold, batch_size, track):
                    lines.write(jsonl_line(result) + "\n")
                    lines.flush()  # a crash keeps every line written so far
                    if on_frame is not None:
                        on_frame(result)
                    if writer is not None:
                        pred = result.prediction
                        drawn = draw_detections(Image.fromarray(result.image), pred.boxes, captions(pred), pred.scores)
                        writer.write(np.asarray(drawn))
                    frames += 1
                    detections += len(result.prediction)
                    bar.update(1)
        except KeyboardInterrupt:
            log.warning("interrupted after %d frame(s) of '%s'; its outputs hold the frames processed so far",
                        frames, source)
            raise
        finally:
            if writer is not None:
                writer.close()
    return VideoSummary(str(source), frames, detections, jsonl, video if video is not None and video.exists() else None)
