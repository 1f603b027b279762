"""COCO-style evaluation: predict a dataset, then pycocotools' COCOeval on the dataset's own GT.

Batch-size independence.  DINO is not exactly invariant to zero padding (the backbone convolutions
and the GroupNorm of the input projection see the padded border), and even a batch of equally
sized images is not bit-identical to running them one by one (matrix-multiply kernels block the
rows differently; logits differ by ~1e-6, enough to reorder near-tied scores in COCOeval).  So,
like the official evaluation (a val loader of batch size 1), every image is forwarded on its own,
unpadded: an image's detections never depend on which images share its loader batch and AP is
identical for every evaluation batch size.  The batch size only sets how many images the loader
prepares at a time.  ``batch_same_size=True`` trades that exactness for throughput: equally sized
images of a loader batch then run as one unpadded batch (results equal up to float noise).

Runners.  ``model`` is a PyTorch module (the model or an ``inference.modes.ModeRunner``) returning the
raw outputs, or any ``DetectionRunner``: an object whose ``run(images, mask, orig_sizes)`` returns the
top-k ``Detections`` of a preprocessed CPU batch, such as the exported-model runtimes
(``inference.onnx_runtime.OnnxDetector``, ``inference.openvino_runtime.OpenVinoDetector``).  Both see
the same dataset, the same resize and the same COCOeval, so their AP compares like with like.

Distributed: every rank predicts a strided shard of the images (no padding or duplicates, unlike
DistributedSampler), the COCO records are gathered to rank 0, which runs COCOeval, and the metrics
are broadcast so every rank returns the same dict.
"""
from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import image_hw, size_groups
from ..inference.modes import autocast as amp_autocast
from ..inference.records import coco_records
from ..models.postprocess import Detections, postprocess
from ..targets import Target
from .confusion import coco_confusion
from .distributed import DistInfo, all_gather_objects, broadcast_object

#: COCOeval.stats in order; the AP* entries are the headline metrics written to metrics.json.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
HEADLINE = COCO_STATS[:6]


@dataclass
class EvalResult:
    """COCO metrics (fractions in 0..1; -1 where the split has no GT in that size range, as in
    pycocotools) and what they were computed from.

    ``per_class``: dataset class name -> {"AP", "AP50"} (-1: no GT of that class).
    ``pr_curves``: "recall" (COCO's 101 recall points) and, per IoU threshold ("IoU=0.50",
    "IoU=0.75", "IoU=0.50:0.95"), the precision at each of them averaged over the classes.
    ``confusion``: the confusion matrix (``confusion.coco_confusion``; empty when not computed).
    ``records``: the COCO result records (rank 0 only).
    ``unreadable_ids``: ids of the images that could not be read (left out of the scores).
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    pr_curves: dict[str, list[float]] = field(default_factory=dict)
    unreadable_ids: list[int] = field(default_factory=list)
    confusion: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class DetectionRunner(Protocol):
    """What evaluates besides a PyTorch module: ``run(images [B, 3, H, W] float32 normalised,
    mask [B, H, W] bool, orig_sizes [B, 2] int64 (h, w)) -> Detections`` (top-k per image, boxes
    x0, y0, x1, y1 in pixels of the original image), all on the CPU."""

    num_select: int

    def run(self, images: Tensor, mask: Tensor, orig_sizes: Tensor) -> Detections: ...


class _Indexed(Dataset):
    """``(index, dataset[index])``: tells which image an unreadable (None) item was."""

    def __init__(self, dataset: Dataset, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.dataset[self.indices[i]]


def _as_list(batch: list[Any]) -> list[Any]:
    return batch  # keep images unpadded; grouping by size happens in predict_dataset


def same_size_groups(items: Sequence[tuple[Tensor, Target]]) -> list[list[int]]:
    """Indices of ``items`` grouped by image size (first-appearance order, input order within)."""
    return size_groups([image_hw(image) for image, _ in items])


@torch.inference_mode()
def predict_dataset(
    model: nn.Module | DetectionRunner,
    dataset: Dataset,
    category_ids: Sequence[int | None],
    *,
    device: torch.device,
    batch_size: int = 1,
    num_select: int = 300,
    amp: str = "off",
    dist_info: DistInfo = DistInfo(),
    num_workers: int = 0,
    progress: bool = False,
    batch_same_size: bool = False,
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO result records for every readable image of ``dataset``, and the ids of the images that
    could not be read (all ranks' on rank 0; empty lists on the others).  ``model``: a module or a
    ``DetectionRunner`` (see the module docstring; a runner's own top-k size applies)."""
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    shard = _Indexed(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    # an own generator: creating a loader iterator draws a seed from it, and must not advance the
    # global torch RNG (training continues from it; resume equality depends on that)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list, generator=torch.Generator().manual_seed(0))
    records: list[dict[str, Any]] = []
    unreadable: list[int] = []
    from tqdm import tqdm

    # rank 0's bar counts the whole dataset, assuming the other ranks keep pace with it
    bar = tqdm(total=len(dataset), desc="eval", unit="img", file=sys.stderr, leave=False,
               disable=not (progress and dist_info.is_main))
    try:
        for batch in loader:
            items = [x for _, x in batch if x is not None]
            unreadable += [int(dataset.image_ids[i]) for i, x in batch if x is None]
            groups = same_size_groups(items) if batch_same_size else [[i] for i in range(len(items))]
            for group in groups:
                records.extend(_predict_group([items[i] for i in group], model, category_ids,
                                              device, num_select, amp))
            bar.update(min(len(batch) * dist_info.world_size, bar.total - bar.n))
    finally:
        bar.close()
        if is_module:
            model.train(was_training)
    gathered = all_gather_objects((records, unreadable), dist_info)
    if not dist_info.is_main:
        return [], []
    return [r for part, _ in gathered for r in part], sorted(i for _, part in gathered for i in part)


def _predict_group(items: list[tuple[Tensor, Target]], model: nn.Module | DetectionRunner,
                   category_ids: Sequence[int | None], device: torch.device, num_select: int,
                   amp: str) -> list[dict[str, Any]]:
    if not isinstance(model, nn.Module):  # an exported model's runtime: CPU tensors in, detections out
        images = torch.stack([im for im, _ in items]).cpu()
        mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        det = model.run(images, mask, torch.stack([t["orig_size"] for _, t in items]).cpu())
        return [r for i, (_, target) in enumerate(items) for r in
                coco_records(det.scores[i], det.labels[i], det.boxes[i], category_ids, image_id=int(target["image_id"]))]
    images = torch.stack([im for im, _ in items]).to(device, non_blocking=True)
    mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=device)
    # queued before the forward, so that post-processing follows it without the host waiting
    orig_sizes = torch.stack([t["orig_size"] for _, t in items]).to(device, non_blocking=True)
    with amp_autocast(device, amp):
        out = model(images, mask)
    det = postprocess(out.pred_logits.float(), out.pred_boxes.float(), orig_sizes, num_select)
    scores, labels, boxes = det.scores.cpu(), det.labels.cpu(), det.boxes.cpu()  # the batch's one wait
    records = []
    for i, (_, target) in enumerate(items):
        records.extend(coco_records(scores[i], labels[i], boxes[i], category_ids, image_id=int(target["image_id"])))
    return records


@dataclass
class CocoScores:
    """What COCOeval gives for one set of detections, and their confusion matrix (see EvalResult)."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    pr_curves: dict[str, list[float]]
    confusion: dict[str, Any]


def coco_scores(coco_gt: Any, records: Sequence[dict[str, Any]],
                image_ids: Sequence[int] | None = None) -> CocoScores:
    """COCOeval (bbox) of ``records`` against ``coco_gt`` (a pycocotools COCO) on ``image_ids``
    (default: every GT image; images without predictions are misses).  pycocotools' printing is
    swallowed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = sorted(coco_gt.getCatIds())
    cats = coco_gt.loadCats(cat_ids)
    counts = Counter(c["name"] for c in cats)  # a name used twice is told apart by its id
    names = [c["name"] if counts[c["name"]] == 1 else f"{c['name']} (id {c['id']})" for c in cats]
    with contextlib.redirect_stdout(io.StringIO()):
        if records:
            coco_dt = coco_gt.loadRes([dict(r) for r in records])  # loadRes edits the dicts it gets
        else:  # loadRes cannot take an empty list: an empty result set scores 0 (or -1: no GT)
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset.get("images", []), "categories": cats, "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision [T iou thresholds, R recall points, K classes, A area ranges, M max dets]; -1: no GT.
    # area "all" and 100 detections, the setting of the headline AP
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {name: {"AP": _mean_valid(precision[:, :, k]), "AP50": _mean_valid(precision[0, :, k])}
                 for k, name in enumerate(names)}
    curves: dict[str, list[float]] = {"recall": [float(r) for r in evaluator.params.recThrs]}
    for label, rows in (("IoU=0.50", precision[:1]), ("IoU=0.75", precision[5:6]), ("IoU=0.50:0.95", precision)):
        if (rows > -1).any():  # mean over IoU thresholds and the classes that have GT, per recall point
            curves[label] = [_mean_valid(rows[:, r]) for r in range(rows.shape[1])]
    confusion = coco_confusion(coco_gt, records, names, evaluator.params.imgIds)
    return CocoScores({k: float(v) for k, v in zip(COCO_STATS, evaluator.stats)}, per_class, curves, confusion)


def _mean_valid(values: Any) -> float:
    """Mean of the entries that are not -1 (COCOeval's "no GT"), or -1 when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def coco_metrics(coco_gt: Any, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCOeval's twelve summary numbers (``COCO_STATS``) of ``records`` on every GT image."""
    return coco_scores(coco_gt, records).metrics


def evaluate(
    model: nn.Module | DetectionRunner,
    dataset: Any,
    category_ids: Sequence[int | None],
    *,
    device: torch.device,
    batch_size: int = 1,
    num_select: int = 300,
    amp: str = "off",
    dist_info: DistInfo = DistInfo(),
    num_workers: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Predict ``dataset`` (a DetectionDataset with eval transforms and a ``.coco`` GT) and score it.

    ``category_ids[k]`` is the dataset category id of model class k (None: ignore that class).
    Images that cannot be read are reported (by the dataset), left out of the scores and counted in
    ``metrics["unreadable_images"]``; ``metrics["num_images"]`` counts the images scored.
    Every rank gets the metrics; the records are kept on rank 0 only.
    """
    records, unreadable = predict_dataset(model, dataset, category_ids, device=device, batch_size=batch_size,
                                          num_select=num_select, amp=amp, dist_info=dist_info,
                                          num_workers=num_workers, progress=progress)
    scores = None
    if dist_info.is_main:
        skipped = set(unreadable)
        scored = [i for i in dataset.image_ids if i not in skipped] if skipped else None
        scores = coco_scores(dataset.coco, records, scored)
    scores, unreadable = broadcast_object((scores, unreadable), dist_info)
    metrics = dict(scores.metrics)
    metrics["num_images"] = len(dataset) - len(unreadable)  # counts stay ints in metrics.json
    if unreadable:
        metrics["unreadable_images"] = len(unreadable)
    return EvalResult(metrics=metrics, records=records, per_class=scores.per_class, pr_curves=scores.pr_curves,
                      unreadable_ids=list(unreadable), confusion=scores.confusion)


def format_metrics(metrics: dict[str, float]) -> str:
    """Human-readable AP lines, e.g. for the CLI."""
    labels = {"AP": "AP @[.50:.95]", "AP50": "AP @.50", "AP75": "AP @.75",
              "APs": "AP small", "APm": "AP medium", "APl": "AP large"}
    lines = []
    for key in HEADLINE:
        v = metrics.get(key)
        if v is None:
            continue
        missing = "n/a (no GT of that size)" if key in ("APs", "APm", "APl") else "n/a (no ground truth)"
        lines.append(f"{labels[key]:<14} {missing if v < 0 else f'{v:.4f}'}")
    return "\n".join(lines)


def format_per_class(per_class: dict[str, dict[str, float]], columns: int = 3) -> str:
    """AP per class as a table of ``columns`` (name, AP) pairs per line; "-" for no GT."""
    cells = [(name, "-" if v["AP"] < 0 else f"{v['AP']:.3f}") for name, v in per_class.items()]
    if not cells:
        return ""
    width = max(len(n) for n, _ in cells)
    rows = []
    for start in range(0, len(cells), columns):
        rows.append("   ".join(f"{n:<{width}} {ap:>5}" for n, ap in cells[start:start + columns]))
    return "\n".join(rows)


def category_mapping(
    class_names: Sequence[str], category_ids: Sequence[int], dataset_names: Sequence[str],
    dataset_ids: Sequence[int],
) -> tuple[list[int | None], str]:
    """Map a model's classes onto a dataset's categories for evaluation.

    By category id when the model knows every dataset category under the same id and name (a model
    trained on this dataset, or an official COCO model on COCO-format data); otherwise by class
    name (case-insensitive), e.g. a COCO model on YOLO-format data whose ids are 0..79.  Model
    classes without a counterpart map to None (their detections are dropped).

    Returns (mapping, how) where ``how`` is "id" or "name".
    Raises ValueError when no class matches at all.
    """
    by_id = {int(c): n for c, n in zip(category_ids, class_names)}
    if all(by_id.get(int(c), "").lower() == n.lower() for c, n in zip(dataset_ids, dataset_names)):
        return [int(c) for c in category_ids], "id"
    by_name = {n.lower(): int(c) for c, n in zip(dataset_ids, dataset_names)}
    mapping = [by_name.get(n.lower()) for n in class_names]
    if not any(m is not None for m in mapping):
        raise ValueError("none of the model's classes matches the dataset's categories (by id or by name)")
    return mapping, "name"
