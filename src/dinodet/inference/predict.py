"""Prediction over image files and folders into an output folder (what ``dinodet predict`` runs).

For every input image, an annotated picture ``OUT/<stem>.jpg`` and its detections as COCO result
records in ``OUT/predictions.json``.  Made for unattended runs over many files: the inputs and the
output folder are checked before the (slow) model loading, a batch that fails (e.g. out of memory
on one huge image) is retried image by image, and in a set of images an unreadable or failing one
is reported (a logged warning) and skipped instead of ending the run.  A lone image that fails is
the run's error.  A picture that cannot be written (JPEG stops at 65,500 pixels a side, a full
disk) is a warning: the image's detections still go to predictions.json.  No file the user put in
the folder is replaced (``files.check_not_foreign``) unless ``overwrite``.  Video files, a webcam index
and stream URLs among the inputs go to ``video.predict_video_to_folder`` (``OUT/<stem>.mp4`` and
``OUT/<stem>.jsonl``) under the same rules.  Records carry an ``image_id`` that ``COCO.loadRes``
accepts: from an ``image_info`` file (a COCO annotation or image-info file) matched by file name, else
1..N in input order; ``classes``, ``max_det`` and ``agnostic_nms`` select detections for every output
alike.  Optional extras: ByteTrack ids for videos (``track``), YOLO label files and a CSV
(``exports``), tiled inference for small objects (``tiling``).
"""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import IMAGE_EXTENSIONS, ImageLoadError, iter_image_paths, load_image
from ..errors import ConfigError, first_line
from ..files import check_not_foreign, check_out_folder, record_outputs, save_image_atomic, write_json_atomic
from .exports import DetectionExports, frame_label_name
from .extras import require
from .tiling import DEFAULT_OVERLAP, TilingDetector, check_tiling
from .video import (
    VIDEO_EXTENSIONS,
    VideoSummary,
    is_file_source,
    is_video_source,
    predict_video_to_folder,
    source_stem,
)

if TYPE_CHECKING:
    from PIL import Image

    from .detector import Detector
    from .onnx_runtime import OnnxDetector
    from .openvino_runtime import OpenVinoDetector

    AnyDetector = Detector | OnnxDetector | OpenVinoDetector

log = logging.getLogger(__name__)

PREDICTIONS_JSON = "predictions.json"
AUTO_DEVICE = "auto"  # as detector.AUTO_DEVICE (not imported: that module pulls in torch)
COMMAND = "predict"  # what the folder's manifest says wrote the files
JPEG_MAX_SIDE = 65_500  # libjpeg's limit: a larger image gets no picture, its detections are kept
PROGRESS_MIN_IMAGES = 5  # below this a progress bar is more noise than help


@dataclass(frozen=True)
class DetectorOptions:
    """How to make the detector of a prediction run: a torch ``checkpoint``, ``random_weights`` of
    ``preset`` (smoke tests), or an exported ``model`` run by ``backend``: ``onnxruntime`` (an .onnx
    file) or ``openvino`` (an OpenVINO IR .xml or an .onnx file; the default for an .xml).  Given to
    ``predict_to_folder`` instead of a detector, it is built only after the inputs and the output
    folder passed their checks, so a typo costs no model loading."""

    checkpoint: str | Path | None = None
    model: str | Path | None = None
    random_weights: bool = False
    preset: str | None = None
    device: str = "auto"  # cuda when available, else cpu (an exported model: cpu)
    size: int | None = None
    max_size: int | None = None
    mode: str = "exact"
    backend: str | None = None  # torch, onnxruntime or openvino; None: from what is given
    one_label_per_query: bool = False  # each query's best class only (default: the official top-k)

    @property
    def resolved_backend(self) -> str:
        """The backend that runs: as given, else openvino for an .xml model, onnxruntime for another
        model file, torch for a checkpoint or random weights."""
        if self.backend is not None:
            return self.backend
        if self.model is None:
            return "torch"
        return "openvino" if Path(self.model).suffix.lower() == ".xml" else "onnxruntime"

    def check(self) -> None:
        """Before anything is loaded: the options name one model, a backend that runs it, and a
        resize that fits the rule (``check_resize``).  Messages name the CLI's options.

        Raises:
            ConfigError: options that do not fit together.
        """
        from ..data.transforms import check_resize

        backend = self.resolved_backend
        if backend not in ("torch", "onnxruntime", "openvino"):
            raise ConfigError(f"unknown backend '{backend}' (torch, onnxruntime or openvino)")
        if backend != "torch" and not self.model:
            raise ConfigError(f"--backend {backend} needs --model MODEL.onnx (made by `dinodet export`)")
        if backend == "torch" and self.model:
            raise ConfigError("--model is an exported model: use it with --backend onnxruntime or openvino "
                              "(or drop --backend)")
        if backend == "onnxruntime" and Path(self.model).suffix.lower() == ".xml":
            raise ConfigError("--model is an OpenVINO IR: use it with --backend openvino (or drop --backend)")
        if backend == "torch" and not (self.checkpoint or self.random_weights):
            raise ConfigError("one of --checkpoint PATH, --random-weights or --model MODEL.onnx is required")
        if self.model and self.preset:
            raise ConfigError("--preset does not apply to --model (the ONNX file records its preset)")
        if self.random_weights and not self.preset:
            raise ConfigError("--random-weights needs --preset NAME (e.g. --preset tiny)")
        check_resize(self.size, self.max_size, ("--size", "--max-size"))
        if backend != "torch" and self.mode != "exact":
            raise ConfigError("--mode applies to the PyTorch backend; an exported model runs as it was exported")
        if backend != "torch" and self.one_label_per_query:
            raise ConfigError("--one-label-per-query applies to the PyTorch backend; an exported model runs its "
                              "top-k as it was exported")

    def build(self) -> AnyDetector:
        """The detector (logs a warning for random weights, a note for compiled modes).

        Raises:
            CheckpointError, ConfigError: see ``Detector.from_checkpoint`` / ``OnnxDetector`` /
                ``OpenVinoDetector``.
        """
        # deferred: torch + torchvision take seconds; checking the inputs needs neither
        from .detector import Detector

        self.check()
        if self.model is not None:
            backend = self.resolved_backend
            # an exported model runs on the CPU unless a GPU is asked for by name: "auto" means the CPU there
            device = "cpu" if self.device == AUTO_DEVICE else self.device
            if backend == "openvino":
                from .openvino_runtime import OpenVinoDetector

                return OpenVinoDetector(self.model, device=device, size=self.size, max_size=self.max_size)
            if backend != "onnxruntime":
                raise ConfigError(f"an exported model runs with the onnxruntime or openvino backend, not '{backend}'")
            from .onnx_runtime import OnnxDetector

            return OnnxDetector(self.model, device=device, size=self.size, max_size=self.max_size)
        if self.random_weights:
            if not self.preset:
                raise ConfigError("random weights need a preset")
            detector = Detector.from_random(self.preset, device=self.device, size=self.size,
                                            max_size=self.max_size, mode=self.mode,
                                            one_label_per_query=self.one_label_per_query)
            log.warning("using RANDOM weights for preset '%s': the detections are meaningless", self.preset)
        elif self.checkpoint is not None:
            detector = Detector.from_checkpoint(self.checkpoint, preset=self.preset, device=self.device,
                                                size=self.size, max_size=self.max_size, mode=self.mode,
                                                one_label_per_query=self.one_label_per_query)
        else:
            raise ConfigError("a checkpoint, random weights or an ONNX model is required")
        note_compile(self.mode)
        return detector


def note_compile(mode: str) -> None:
    """Say (a logged note) why a compiled mode's first batches are slow, before a progress bar
    seems to stall."""
    from .modes import get_mode

    if get_mode(mode).compile:
        log.info("mode '%s' compiles the model on the first batch of a new image size (at most 3 times; minutes "
                 "on a CPU); the compiled code is cached for later runs (TORCHINDUCTOR_CACHE_DIR)", mode)


@dataclass(frozen=True)
class Output:
    """Where one input image's results go: its annotated picture (a file name in the output
    folder) and the ``file_name`` of its records in predictions.json."""

    picture: str
    file_name: str


@dataclass(frozen=True)
class PredictSummary:
    """What a prediction run did: ``images`` inputs found, ``done`` of them predicted and drawn (the
    others were reported and skipped), their COCO ``records`` and where they were written (None when
    there was no image), and one summary per video source that was processed."""

    images: int
    done: int
    predictions: Path | None
    records: list[dict[str, Any]] = field(default_factory=list)
    videos: list[VideoSummary] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)  # labels/ (--save-txt) and predictions.csv (--save-csv)

    @property
    def skipped(self) -> int:
        return self.images - self.done


@dataclass(frozen=True)
class Selection:
    """Which detections a run keeps: with ``agnostic_nms`` (an IoU) first class-agnostic NMS (of two
    boxes overlapping more, whatever their classes, the lower score goes), then those whose category id
    is in ``category_ids`` or whose class name is in ``names`` (every class when both are empty), then
    at most ``max_det`` per image, the highest scores (a Prediction is sorted by score)."""

    category_ids: frozenset[int] = frozenset()
    names: frozenset[str] = frozenset()
    max_det: int | None = None
    agnostic_nms: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.category_ids or self.names) or self.max_det is not None or self.agnostic_nms is not None

    def apply(self, pred: Any) -> Any:
        """``pred`` (a ``Prediction``) with only the selected detections."""
        import torch

        if self.agnostic_nms is not None:
            pred = agnostic_nms(pred, self.agnostic_nms)
        keep = [i for i, (cat, name) in enumerate(zip(pred.category_ids.tolist(), pred.class_names))
                if not (self.category_ids or self.names) or cat in self.category_ids or name in self.names]
        return pred.select(torch.tensor(keep[: self.max_det], dtype=torch.int64))


def agnostic_nms(pred: Any, iou: float) -> Any:
    """``pred`` (a ``Prediction``) after class-agnostic NMS (``torchvision.ops.nms`` at ``iou``): one box
    per object even where the model gave it two classes.  The order (by score) is kept."""
    import torch
    from torchvision.ops import nms

    keep = nms(pred.boxes.float(), pred.scores.float(), iou)
    return pred.select(torch.sort(keep).values)  # nms returns them by score; sorted positions keep ties stable


def make_selection(classes: Sequence[int | str] | None, max_det: int | None,
                   known_names: Sequence[str] | None = None, agnostic_nms: float | None = None) -> Selection:
    """The Selection of ``classes`` (category ids and/or class names), ``max_det`` and
    ``agnostic_nms`` (an IoU).  With ``known_names`` (the model's classes) a name the model does not
    have is an error, since it would silently select nothing.

    Raises:
        ConfigError: an empty ``classes``, ``max_det`` < 1, an IoU outside (0, 1] or an unknown class name.
    """
    if classes is not None and not classes:
        raise ConfigError("--classes needs at least one category id or class name")
    if max_det is not None and max_det < 1:
        raise ConfigError(f"--max-det must be >= 1, got {max_det}")
    if agnostic_nms is not None and not 0.0 < agnostic_nms <= 1.0:
        raise ConfigError(f"--agnostic-nms takes an IoU in (0, 1], got {agnostic_nms}")
    names = frozenset(c for c in classes or () if isinstance(c, str))
    if known_names is not None and names - set(known_names):
        unknown = ", ".join(repr(n) for n in sorted(names - set(known_names)))
        raise ConfigError(f"--classes: unknown class name(s) {unknown}; the model's classes are "
                          f"{', '.join(dict.fromkeys(known_names))}")
    ids = frozenset(int(c) for c in classes or () if not isinstance(c, str))
    return Selection(ids, names, max_det, agnostic_nms)


class SelectingDetector:
    """A detector whose predictions keep only ``selection``'s detections: one place that serves the
    pictures, predictions.json and the video JSONL alike."""

    def __init__(self, detector: AnyDetector, selection: Selection) -> None:
        self.detector, self.selection = detector, selection
        self.class_names = detector.class_names

    def predict(self, images: Sequence[Any], threshold: float = 0.3, batch_size: int = 1) -> list[Any]:
        preds = self.detector.predict(images, threshold=threshold, batch_size=batch_size)
        return [self.selection.apply(p) for p in preds]


def image_ids(paths: Sequence[Path], image_info: str | Path | None) -> dict[Path, int]:
    """The COCO ``image_id`` of each input: 1..N in input order, or with ``image_info`` (a COCO
    annotation or image-info file) the id of the entry whose ``file_name`` is the input's path tail
    (``val2017/a.jpg`` matches ``data/val2017/a.jpg``; a bare name matches when no other entry has
    it).  Inputs not in the file are left out, with one warning for all of them.

    Raises:
        ConfigError: the file cannot be read, has no ``images`` list, or names none of the inputs.
    """
    if image_info is None:
        return {p: i for i, p in enumerate(paths, start=1)}
    try:
        entries = json.loads(Path(image_info).read_text(encoding="utf-8"))["images"]
        by_name = {str(e["file_name"]).replace("\\", "/"): int(e["id"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--image-info '{image_info}' is not a readable COCO annotation or image-info file "
                          f"(an \"images\" list of {{\"id\", \"file_name\"}}): {first_line(e)}") from e
    bare = Counter(name.rsplit("/", 1)[-1] for name in by_name)
    by_bare = {name.rsplit("/", 1)[-1]: i for name, i in by_name.items() if bare[name.rsplit("/", 1)[-1]] == 1}
    ids: dict[Path, int] = {}
    for p in paths:
        parts = p.as_posix().split("/")
        found = next((by_name[t] for t in ("/".join(parts[k:]) for k in range(len(parts))) if t in by_name),
                     by_bare.get(p.name))
        if found is not None:
            ids[p] = found
    missing = [p for p in paths if p not in ids]
    if paths and len(missing) == len(paths):
        raise ConfigError(f"none of the {len(paths)} images is in --image-info '{image_info}' (matched by file name)")
    if missing:
        log.warning("%d image(s) are not in '%s' (e.g. '%s'): their detections are left out of %s",
                    len(missing), image_info, missing[0], PREDICTIONS_JSON)
    return ids


def gather_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files of ``inputs`` (files, and folders expanded to the images directly inside),
    each once: a file named twice (also as "a.jpg" and "dir/../a.jpg") runs once.

    Raises:
        ImageLoadError: a missing input, or no image at all.
    """
    unique: dict[Path, Path] = {}
    for path in iter_image_paths([str(p) for p in inputs]):
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise ImageLoadError(f"no images found in {', '.join(repr(str(p)) for p in inputs)}")
    return list(unique.values())


def output_names(paths: Sequence[Path], out_dir: Path) -> dict[Path, Output]:
    """Picture ``<stem>.jpg`` and file_name ``<name>`` per input, as long as those are unique.  Inputs
    whose stem is shared (``cam1/0001.jpg`` and ``cam2/0001.jpg``, or ``a.jpg`` and ``a.png``) get
    ``<folder>_<stem>[_<ext>].jpg`` (a number added if still not unique) and their path as given as
    file_name, so that no result overwrites another.

    Raises:
        ConfigError: a picture would overwrite an input image (e.g. the output folder is the image folder).
    """
    stems = Counter(p.stem for p in paths)
    names = Counter(p.name for p in paths)
    outputs: dict[Path, Output] = {}
    taken: set[str] = {f"{p.stem}.jpg" for p in paths if stems[p.stem] == 1}
    for p in paths:
        picture = f"{p.stem}.jpg"
        if stems[p.stem] > 1:
            ext = p.suffix.lower().lstrip(".")
            base = "_".join(x for x in (p.parent.name, p.stem, ext if ext != "jpg" else "") if x)
            picture, n = f"{base}.jpg", 2
            while picture in taken:
                picture, n = f"{base}_{n}.jpg", n + 1
            taken.add(picture)
        if (out_dir / picture).resolve() == p.resolve():
            raise ConfigError(f"--out '{out_dir}' would overwrite the input image '{p}'; choose another folder")
        outputs[p] = Output(picture, p.name if names[p.name] == 1 else str(p))
    return outputs


def predict_to_folder(
    detector: AnyDetector | DetectorOptions,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    threshold: float = 0.3,
    batch_size: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    save_images: bool = True,
    vid_stride: int = 1,
    max_frames: int | None = None,
    image_info: str | Path | None = None,
    classes: Sequence[int | str] | None = None,
    max_det: int | None = None,
    agnostic_nms: float | None = None,
    track: bool = False,
    save_txt: bool = False,
    save_csv: bool = False,
    tile: int | None = None,
    tile_overlap: float = DEFAULT_OVERLAP,
) -> PredictSummary:
    """Detect objects in ``inputs`` (image files and/or folders, video files, a webcam index, stream
    URLs) and write ``out_dir/<stem>.jpg`` (detections drawn; not without ``save_images``) and
    ``out_dir/predictions.json`` (COCO records, bbox xywh in original pixels, rounded) for the images,
    ``out_dir/<stem>.mp4`` and ``out_dir/<stem>.jsonl`` for each video (see
    ``video.predict_video_to_folder``: every ``vid_stride``-th frame, at most ``max_frames``).
    ``out_dir`` is created if needed, and removed again if nothing came of the run.  Files of those
    names that dinodet did not write are replaced only with ``overwrite``.  Records carry ``image_id``
    (see ``image_ids``: from ``image_info``, else 1..N), ``file_name`` and ``class_name``.  ``classes``
    (category ids and/or class names), ``max_det`` (per image or frame) and ``agnostic_nms`` (an IoU,
    see ``Selection``) select the detections of every output.  ``track`` gives video detections
    ByteTrack ids (``tracking.Tracker``); ``save_txt`` / ``save_csv`` also write YOLO label files and
    one CSV (``exports.DetectionExports``); ``tile`` predicts images and frames larger than ``tile``
    pixels in overlapping tiles (``tiling.TilingDetector``).  Folders may hold images and videos.

    Raises:
        ImageLoadError: no input, a lone input that cannot be read, or no image that could be processed.
        ConfigError: ``out_dir`` is not writable, would overwrite an input or (without ``overwrite``)
            holds a file of an output's name that dinodet did not write; the video extra is missing;
            ``image_info`` is unreadable or names none of the images; an unknown class name in ``classes``;
            ``track`` or ``tile`` without their packages; a bad tile size or overlap.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    check_tiling(tile, tile_overlap)
    image_inputs, videos = split_inputs(inputs)
    paths = gather_images(image_inputs) if image_inputs or not videos else []
    out_dir = Path(out_dir)
    outputs = output_names(paths, out_dir)
    make_selection(classes, max_det, agnostic_nms=agnostic_nms)  # the checks that need no model, before it is loaded
    ids = image_ids(paths, image_info)
    stems = video_stems(videos, out_dir)
    check_out_folder(out_dir)
    names = [*(o.picture for o in outputs.values() if save_images), *([PREDICTIONS_JSON] if paths else []),
             *(f"{stem}{ext}" for stem in stems.values() for ext in ((".jsonl", ".mp4") if save_images else
                                                                     (".jsonl",)))]
    check_not_foreign(out_dir, names, overwrite=overwrite)
    exports = DetectionExports(out_dir, save_txt, save_csv, track=track and bool(videos))
    exports.check([Path(o.picture).stem for o in outputs.values()], overwrite)
    for source in videos:  # a typo costs no model loading
        if is_file_source(source) and not Path(source).is_file():
            raise ImageLoadError(f"video file '{source}' not found")
    if track and not videos:
        log.warning("--track applies to videos and streams; the images are predicted one by one")
    if track and videos:
        require("trackers", "tracking (--track)")
    if tile is not None:
        require("supervision", "tiled inference (--tile)")
    if isinstance(detector, DetectorOptions):
        detector = detector.build()
    selection = make_selection(classes, max_det, detector.class_names if classes else None, agnostic_nms)
    if tile is not None:
        detector = TilingDetector(detector, tile, tile_overlap)
    if selection.active:
        detector = SelectingDetector(detector, selection)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []  # the pictures written, recorded even when the run stops halfway
    done = 0
    records: list[dict[str, Any]] = []
    # A lone unreadable image is an error; in a set of images it is reported and skipped.
    try:
        if paths:
            records, done = _predict_files(detector, outputs, ids, out_dir, threshold, batch_size,
                                           len(paths) + len(videos) > 1,
                                           progress and len(paths) >= PROGRESS_MIN_IMAGES, written, save_images,
                                           exports)
    finally:
        record_outputs(out_dir, written, COMMAND)
        if created and done == 0 and not videos and not any(out_dir.iterdir()):  # nothing came of it
            out_dir.rmdir()
    json_path = None
    if paths and done == 0 and not videos:
        raise ImageLoadError(f"none of the {len(paths)} images could be processed (see the warnings above); "
                             "nothing written")
    if paths:
        json_path = out_dir / PREDICTIONS_JSON
        write_json_atomic(json_path, records)
        record_outputs(out_dir, [PREDICTIONS_JSON], COMMAND)
    try:
        done_videos = _predict_videos(detector, stems, out_dir, len(paths) + len(videos) > 1, exports,
                                      threshold=threshold, batch_size=batch_size, vid_stride=vid_stride,
                                      max_frames=max_frames, save_video=save_images, progress=progress, track=track)
    finally:  # also after Ctrl-C: what was predicted so far
        exported = exports.finish() if exports.active else []
    return PredictSummary(images=len(paths), done=done, predictions=json_path, records=records, videos=done_videos,
                          exports=exported)


def split_inputs(inputs: Sequence[str | Path]) -> tuple[list[str | Path], list[str]]:
    """(image inputs, video sources) of ``inputs``: a folder's videos (by extension, sorted by name)
    join the video sources, its images stay with the folder; a folder with neither stays an image
    input (``gather_images`` reports it)."""
    images: list[str | Path] = []
    videos: list[str] = []
    for item in inputs:
        path = Path(item)
        if is_video_source(item):
            videos.append(str(item))
        elif path.is_dir():
            children = sorted(c for c in path.iterdir() if c.is_file())
            found = [str(c) for c in children if c.suffix.lower() in VIDEO_EXTENSIONS]
            videos.extend(found)
            if not found or any(c.suffix.lower() in IMAGE_EXTENSIONS for c in children):
                images.append(item)
        else:
            images.append(item)
    return images, videos


def video_stems(sources: Sequence[str], out_dir: Path) -> dict[str, str]:
    """The output stem of each video source (``<stem>.mp4`` / ``<stem>.jsonl``): its stem, with the
    extension (and a number if still taken) added when two sources share it.

    Raises:
        ConfigError: the annotated video would overwrite an input (e.g. ``--out`` is the video's folder).
    """
    counts = Counter(source_stem(s) for s in sources)
    stems: dict[str, str] = {}
    for source in dict.fromkeys(sources):
        stem = base = source_stem(source)
        if counts[base] > 1:
            ext = Path(source).suffix.lower().lstrip(".")
            stem = base = f"{base}_{ext}" if ext else base
            n = 2
            while stem in stems.values():
                stem, n = f"{base}_{n}", n + 1
        if is_file_source(source) and (out_dir / f"{stem}.mp4").resolve() == Path(source).resolve():
            raise ConfigError(f"--out '{out_dir}' would overwrite the input video '{source}'; choose another folder")
        stems[source] = stem
    return stems


def _predict_videos(detector: AnyDetector, stems: dict[str, str], out_dir: Path, skip_failures: bool,
                    exports: DetectionExports | None = None, **options: Any) -> list[VideoSummary]:
    """Run ``predict_video_to_folder`` on each source of ``stems``; with ``skip_failures`` a source
    that cannot be opened is reported and skipped.  Its files are in the manifest before they are
    written, so that a crash leaves no file a later run refuses to replace.  Every frame's detections
    also go to ``exports`` when it is active."""
    summaries = []
    for source, stem in stems.items():
        record_outputs(out_dir, [f"{stem}.jsonl", *([f"{stem}.mp4"] if options["save_video"] else [])], COMMAND)
        on_frame = None
        if exports is not None and exports.active:
            def on_frame(result: Any, source: str = source, stem: str = stem) -> None:
                exports.add(result.prediction, source, frame_label_name(stem, result.frame), result.frame)
        try:
            summaries.append(predict_video_to_folder(detector, source, out_dir, stem, on_frame=on_frame, **options))
        except ImageLoadError as e:
            if not skip_failures:
                raise
            log.warning("%s; skipped", e)
    return summaries


def _predict_files(detector: AnyDetector, outputs: dict[Path, Output], ids: dict[Path, int], out_dir: Path,
                   threshold: float, batch_size: int, skip_failures: bool, progress: bool,
                   written: list[str], save_images: bool = True,
                   exports: DetectionExports | None = None) -> tuple[list[dict[str, Any]], int]:
    """Run the detector over the inputs of ``outputs`` (in order); write annotated images (with
    ``save_images``; their names appended to ``written``) and give each image's detections to
    ``exports`` when it is active.  Returns (records, images done); an input without an image id
    (``image_ids``) gets a picture but no records."""
    from tqdm import tqdm

    from .records import coco_records

    paths = list(outputs)
    records: list[dict[str, Any]] = []
    done = 0
    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = load_images(paths[start : start + batch_size], skip_failures)
            for (path, image), pred in predict_chunk(detector, chunk, threshold, skip_failures):
                if save_images:
                    _save_picture(image, pred, out_dir / outputs[path].picture, written)
                if path in ids:
                    records.extend(coco_records(pred.scores, pred.category_ids, pred.boxes, image_id=ids[path],
                                                file_name=outputs[path].file_name, class_names=pred.class_names,
                                                rounded=True))
                if exports is not None and exports.active:
                    exports.add(pred, outputs[path].file_name, f"{Path(outputs[path].picture).stem}.txt")
                done += 1
            bar.update(min(batch_size, len(paths) - start))
    return records, done


def _save_picture(image: Image.Image, pred: Any, picture: Path, written: list[str]) -> None:
    """Draw ``pred`` on ``image`` into ``picture`` (its name appended to ``written``); a picture that
    cannot be written is a warning, since the detections are the result and the picture only shows them."""
    from ..visualize import draw_detections

    try:
        if max(image.size) > JPEG_MAX_SIDE:  # said here: libjpeg would print its own line on stderr
            raise OSError(f"a JPEG holds at most {JPEG_MAX_SIDE} pixels a side, the image is "
                          f"{image.width}x{image.height}")
        save_image_atomic(draw_detections(image, pred.boxes, pred.class_names, pred.scores), picture, quality=90)
        written.append(picture.name)
    except OSError as e:
        log.warning("cannot write '%s': %s; its detections are in %s", picture, e.strerror or e, PREDICTIONS_JSON)


def predict_chunk(detector: AnyDetector, chunk: list[tuple[Path, Image.Image]], threshold: float,
                  skip_failures: bool) -> list[tuple[tuple[Path, Image.Image], Any]]:
    """((path, image), prediction) for a batch of loaded images.  When the batch fails (e.g. out of
    memory on one huge image) each image is retried alone, and one that still fails is reported and
    skipped (with ``skip_failures``; else the error propagates)."""
    if not chunk:
        return []
    try:
        return list(zip(chunk, detector.predict([im for _, im in chunk], threshold=threshold, batch_size=len(chunk))))
    except Exception as e:
        if not skip_failures:
            raise
        if len(chunk) > 1:
            return [r for item in chunk for r in predict_chunk(detector, [item], threshold, skip_failures)]
        log.warning("cannot predict '%s': %s; skipped", chunk[0][0], first_line(e))
        return []


def load_images(paths: Sequence[Path], skip_unreadable: bool) -> list[tuple[Path, Image.Image]]:
    """Load ``paths``; with ``skip_unreadable`` report unreadable ones (one logged warning each)
    and leave them out, otherwise let ImageLoadError propagate."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except ImageLoadError as e:
            if not skip_unreadable:
                raise
            log.warning("%s; skipped", e)
    return loaded
