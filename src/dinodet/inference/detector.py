"""High-level prediction API: ``Detector.from_checkpoint(...).predict(images)``.

Preprocessing is the official evaluation pipeline (short side 800, long side <= 1333, ImageNet
normalisation) and post-processing the official top-k over all (query, class) pairs, so a
converted official checkpoint gives the official detections.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..config import ConfigError, DINOConfig
from ..data.coco_classes import COCO_CLASSES
from ..data.images import load_image, to_rgb
from ..data.transforms import check_resize, eval_transform, image_hw, pad_batch, size_groups
from ..models.build import build_model
from ..models.postprocess import Detections, postprocess
from ..presets import get_preset
from .modes import COMPILE_BUCKET, ModeRunner

if TYPE_CHECKING:
    from .video import FrameResult

log = logging.getLogger(__name__)

#: One input image: a file path, a PIL image, or a [3, H, W] tensor (uint8 0..255 or float 0..1).
ImageInput = str | Path | Image.Image | Tensor | np.ndarray


@dataclass
class Prediction:
    """Detections for one image, sorted by descending score.

    Boxes are (x0, y0, x1, y1) in pixels of the ORIGINAL image (EXIF orientation applied for
    files).  Like the official post-processing they are not clipped, so a box may extend slightly
    past the image border.
    """

    boxes: Tensor  # [N, 4] float32 xyxy
    scores: Tensor  # [N] float32 in 0..1
    labels: Tensor  # [N] int64 class index of the model
    category_ids: Tensor  # [N] int64 dataset category id (COCO id for the official models)
    class_names: list[str]  # N names
    image_size: tuple[int, int]  # (height, width) of the original image
    # [N] int64 with tracking (``predict_stream(..., track=True)``): the detection's track, -1 for one on no
    # confirmed track yet; None without tracking
    track_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, index: Tensor) -> Prediction:
        """These detections at ``index`` (int64 [K] positions, in the order given, or a bool [N] mask)."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        positions = index.tolist()
        return Prediction(boxes=self.boxes[index], scores=self.scores[index], labels=self.labels[index],
                          category_ids=self.category_ids[index], class_names=[self.class_names[i] for i in positions],
                          image_size=self.image_size,
                          track_ids=None if self.track_ids is None else self.track_ids[index])

    def to_supervision(self) -> Any:
        """These detections as ``supervision.Detections`` (xyxy, confidence, class_id = ``labels``,
        ``data["class_name"]``, ``data["category_id"]``), for supervision's annotators, zones and trackers.

        Raises:
            ConfigError: supervision is not installed (``pip install 'dinodet[video]'``).
        """
        from .extras import require

        sv = require("supervision", "Prediction.to_supervision()")
        return sv.Detections(
            xyxy=self.boxes.numpy().reshape(-1, 4), confidence=self.scores.numpy(), class_id=self.labels.numpy(),
            data={"class_name": np.array(self.class_names, dtype=str), "category_id": self.category_ids.numpy()},
        )


#: The default device of every command: CUDA when this machine has it, else the CPU.
AUTO_DEVICE = "auto"


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists here (ConfigError instead of a CUDA traceback).
    ``"auto"`` is ``cuda`` when CUDA is available, else ``cpu``; a GPU chosen is logged (info), the CPU
    fallback only at debug level: it is what every run did before, and said on every CPU run it is noise."""
    if str(device) == AUTO_DEVICE:
        if torch.cuda.is_available():
            device = "cuda"
            log.info("device auto: using cuda (%s)", torch.cuda.get_device_name(0))
        else:
            device = "cpu"
            log.debug("device auto: no CUDA device found, using cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device '{device}': {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: one allocation says whether it is usable here
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError):  # torch's message lists every dispatch key: too long to show
            raise ConfigError(f"device '{device}' is not available here (not in this torch build, or no such "
                              "hardware)") from None
    return dev


def default_label_map(
    num_classes: int, class_names: Sequence[str] | None, category_ids: Sequence[int] | None
) -> tuple[list[str], list[int]]:
    """Names and category ids of every class index.

    Without ``category_ids`` class index k is category id k (the official 91-slot COCO layout);
    without ``class_names`` a 91-class model gets the COCO names and others ``"class <id>"``.
    """
    ids = list(range(num_classes)) if category_ids is None else [int(c) for c in category_ids]
    if class_names is not None:
        names = list(class_names)
    elif num_classes == len(COCO_CLASSES) and category_ids is None:
        names = list(COCO_CLASSES)
    else:
        names = [f"class {c}" for c in ids]
    if len(ids) != num_classes or len(names) != num_classes:
        raise ConfigError(
            f"the model has {num_classes} classes but {len(names)} class names and {len(ids)} category ids were given"
        )
    return names, ids


class Detector:
    """A DINO model plus its preprocessing, post-processing and label map, ready to predict.

    ``size`` / ``max_size`` (the resize, short side and cap on the long side) default to the
    config's evaluation resize (``data.eval_size`` / ``data.max_size``); ``mode`` is an inference
    mode of ``dinodet.inference.modes`` (``exact``: float32; ``bf16``, ``compile`` ... trade precision for
    speed).  The detector owns ``model`` and adapts it to the mode.  ``one_label_per_query`` keeps only
    each query's best class (see ``models.postprocess.postprocess``); the default is the official
    top-k over all (query, class) pairs.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DINOConfig,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        size: int | None = None,
        max_size: int | None = None,
        mode: str = "exact",
        one_label_per_query: bool = False,
    ):
        self.device = resolve_device(device)
        self.one_label_per_query = one_label_per_query
        self.config = config
        self.runner = ModeRunner(model, mode, self.device, copy_model=False)
        self.model = self.runner.model
        self.class_names, category_id_list = default_label_map(
            config.model.num_classes, class_names, category_ids
        )
        self.category_ids: list[int] = list(category_id_list)  # class index -> the dataset's category id
        self._category_ids = torch.tensor(category_id_list, dtype=torch.int64)  # the same, for indexing labels
        check_resize(size, max_size)  # only what is given: a config's eval_size may exceed its max_size
        self.size = config.data.eval_size if size is None else size
        self.max_size = config.data.max_size if max_size is None else max_size

    @property
    def mode(self) -> str:
        return self.runner.mode.name

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        preset: str | None = None,
        device: str | torch.device = "cpu",
        size: int | None = None,
        max_size: int | None = None,
        mode: str = "exact",
        one_label_per_query: bool = False,
    ) -> Detector:
        """Load a dinodet or official DINO checkpoint (see ``dinodet.checkpoint.load_checkpoint``);
        a training checkpoint's EMA weights are used when it has them (they are what was evaluated).

        Raises:
            CheckpointError: missing/unreadable file, or weights that do not fit ``preset``.
            ConfigError: unknown preset, mode or unavailable device.
        """
        check_resize(size, max_size)  # before the slow loading
        dev = resolve_device(device)
        ckpt = load_checkpoint(path, preset=preset, device=str(dev), ema=True)
        return cls(ckpt.model, ckpt.config, ckpt.class_names, ckpt.category_ids, dev, size, max_size, mode,
                   one_label_per_query)

    @classmethod
    def from_random(
        cls,
        preset: str,
        device: str | torch.device = "cpu",
        size: int | None = None,
        max_size: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        mode: str = "exact",
        one_label_per_query: bool = False,
    ) -> Detector:
        """A randomly initialised model: for smoke tests of the pipeline; its boxes are meaningless.

        The global RNG state is left untouched (``seed`` only seeds the initialisation).
        """
        config = get_preset(preset, num_classes=num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(config)
        return cls(model, config, device=device, size=size, max_size=max_size, mode=mode,
                   one_label_per_query=one_label_per_query)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = 0.3,
        batch_size: int = 1,
    ) -> list[Prediction]:
        """Detect objects in one image or a sequence of images.

        Args:
            images: a path, PIL image, [3, H, W] tensor (uint8 0..255 or float 0..1) or uint8
                [H, W, 3] RGB numpy array (OpenCV's arrays are BGR: convert them first), a sequence
                of those, or a [B, 3, H, W] tensor.
            threshold: keep detections with score > threshold.
            batch_size: images prepared together; those that resize to the same shape run as one
                forward pass, others separately (unpadded), so the detections do not depend on
                the batch size (zero padding would change what the backbone sees).
        Returns:
            One Prediction per image, in input order.

        Raises:
            ImageLoadError: a path that cannot be read as an image.
        """
        # compiled modes pad every image to a multiple of COMPILE_BUCKET anyway: group by that size
        multiple = COMPILE_BUCKET if self.runner.mode.compile else 1
        with torch.inference_mode():
            return predict_in_batches(images, self._detect, threshold=threshold, batch_size=batch_size,
                                      size=self.size, max_size=self.max_size, class_names=self.class_names,
                                      category_ids=self._category_ids, group_multiple=multiple)

    def predict_stream(self, source: str | Path, threshold: float = 0.3, vid_stride: int = 1,
                       max_frames: int | None = None, batch_size: int = 1, track: bool = False) -> Iterator[FrameResult]:
        """Per-frame detections (``FrameResult``: frame index, time_s, RGB image, Prediction) of a video
        file, webcam index (``"0"``) or stream URL, as they are decoded; with ``track`` each Prediction
        has ``track_ids`` (ByteTrack); see ``video.predict_stream``.

        Raises:
            ConfigError: PyAV (or for ``track`` the ``trackers`` package) is not installed
                (``pip install 'dinodet[video]'``).
            ImageLoadError: the source cannot be opened.
        """
        from .video import predict_stream

        return predict_stream(self, source, threshold, vid_stride, max_frames, batch_size, track=track)

    def _detect(self, images: Tensor, mask: Tensor, orig_sizes: Tensor) -> Detections:
        out = self.runner(images, mask)
        return postprocess(out.pred_logits.float(), out.pred_boxes.float(), orig_sizes.to(self.device),
                           self.config.model.num_select, one_label_per_query=self.one_label_per_query)


def predict_in_batches(
    images: ImageInput | Sequence[ImageInput],
    detect: Callable[[Tensor, Tensor, Tensor], Detections],
    *,
    threshold: float,
    batch_size: int,
    size: int,
    max_size: int | None,
    class_names: Sequence[str],
    category_ids: Tensor,
    group_multiple: int | None = 1,
) -> list[Prediction]:
    """The prediction loop shared by every backend (``Detector``, ``OnnxDetector``).

    ``images`` (see ``Detector.predict``) are prepared ``batch_size`` at a time; within a batch,
    images whose resized shape rounds up to the same multiple of ``group_multiple`` run together
    (unpadded when the multiple is 1), each group as ``detect(images [G, 3, H, W], mask [G, H, W],
    orig_sizes int64 [G, 2])`` -> top-k Detections.  ``group_multiple=None`` runs each batch as one
    group (a model with a fixed input size pads every image anyway).  Returns one Prediction per
    image, in input order.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_image_list(images)
    results: list[Prediction] = []
    for start in range(0, len(items), batch_size):
        batch, orig_sizes = preprocess_images(items[start:start + batch_size], size, max_size)
        groups = ([list(range(len(batch)))] if group_multiple is None
                  else size_groups([image_hw(im) for im in batch], group_multiple))
        dets = [detect(*pad_batch([batch[i] for i in idx]), orig_sizes[idx]) for idx in groups]
        results.extend(regroup_predictions(groups, dets, orig_sizes, threshold, class_names, category_ids))
    return results


def regroup_predictions(groups: Sequence[Sequence[int]], dets: Sequence[Detections], orig_sizes: Tensor,
                        threshold: float, class_names: Sequence[str], category_ids: Tensor) -> list[Prediction]:
    """Predictions in input order from per-group detections (``dets[g]`` holds the images
    ``groups[g]``, in that order; ``orig_sizes`` int64 [B, 2] in input order)."""
    results: list[Prediction | None] = [None] * len(orig_sizes)
    for idx, det in zip(groups, dets):
        for i, pred in zip(idx, to_predictions(det, orig_sizes[list(idx)], threshold, class_names, category_ids)):
            results[i] = pred
    return [r for r in results if r is not None]


def preprocess_batch(items: Sequence[ImageInput], size: int, max_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Load, resize + normalise (``eval_transform``) and zero-pad a batch of images.

    Returns:
        images float32 [B, 3, H, W], mask bool [B, H, W] (True on padding) and the original
        (height, width) of every image, int64 [B, 2].  Shared by every inference backend.
    """
    images, orig_sizes = preprocess_images(items, size, max_size)
    batch, mask = pad_batch(images)
    return batch, mask, orig_sizes


def preprocess_images(items: Sequence[ImageInput], size: int, max_size: int | None) -> tuple[list[Tensor], Tensor]:
    """Load, resize + normalise (``eval_transform``) each image: float32 [3, h, w] each, and the
    original (height, width) of every image, int64 [B, 2]."""
    loaded = [_as_loaded(x) for x in items]
    orig_sizes = torch.tensor([image_hw(im) for im in loaded], dtype=torch.int64)  # [B, 2] (h, w)
    return [eval_transform(im, size, max_size) for im in loaded], orig_sizes


def _as_loaded(x: ImageInput) -> Image.Image | Tensor:
    """One input as a PIL RGB image or a [3, H, W] tensor."""
    if isinstance(x, (str, Path)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))):
            raise ValueError(f"a numpy image must be uint8 [H, W, 3] RGB (or [H, W] / [H, W, 4]), got {x.dtype} "
                             f"{list(x.shape)}")
        return to_rgb(Image.fromarray(x))
    if isinstance(x, Tensor):
        return x
    raise ValueError(f"unsupported image type {type(x).__name__}: give a path, a PIL image, a [3, H, W] tensor "
                     "or a uint8 [H, W, 3] numpy array")


def to_predictions(det: Detections, orig_sizes: Tensor, threshold: float, class_names: Sequence[str],
                   category_ids: Tensor) -> list[Prediction]:
    """Threshold each image's top-k detections and attach the label map (``category_ids`` int64 [C])."""
    return [
        _to_prediction(det.scores[i], det.labels[i], det.boxes[i], threshold, (h, w), class_names, category_ids)
        for i, (h, w) in enumerate(orig_sizes.tolist())
    ]


def _to_prediction(scores: Tensor, labels: Tensor, boxes: Tensor, threshold: float, image_size: tuple[int, int],
                   class_names: Sequence[str], category_ids: Tensor) -> Prediction:
    """Threshold one image's top-k detections ([S], [S], [S, 4]) and attach the label map."""
    keep = scores > threshold
    # postprocess returns the top-k in descending order, so the kept ones stay sorted
    scores, labels, boxes = scores[keep].float().cpu(), labels[keep].long().cpu(), boxes[keep].float().cpu()
    return Prediction(
        boxes=boxes,
        scores=scores,
        labels=labels,
        category_ids=category_ids[labels],
        class_names=[class_names[k] for k in labels.tolist()],
        image_size=image_size,
    )


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """Normalise the accepted input forms to a flat list of single images."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images.unbind(0))
        raise ValueError(f"expected an image tensor [3, H, W] or [B, 3, H, W], got shape {list(images.shape)}")
    return list(images)
