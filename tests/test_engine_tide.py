"""The TIDE error breakdown on a hand-made image with one error of each kind: the counts are the
known ones, and each dAP equals pycocotools' AP50 of the records (or ground truth) fixed by hand
minus the AP50 of the originals."""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
from pycocotools.cocoeval import COCOeval

from dinodet.data.coco import make_coco
from dinodet.engine.tide import error_breakdown, write_error_chart

A, B = 1, 2  # category ids
BOXES = {"A1": [0, 0, 10, 10], "A2": [40, 0, 10, 10], "A3": [60, 0, 10, 10], "A4": [60, 30, 10, 10],
         "B1": [20, 0, 10, 10], "B2": [80, 0, 10, 10]}
GT = {"images": [{"id": 1, "file_name": "x.jpg", "width": 300, "height": 300},
                 {"id": 2, "file_name": "y.jpg", "width": 300, "height": 300}],
      "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}],
      "annotations": [{"id": k + 1, "image_id": 1, "category_id": A if n[0] == "A" else B, "bbox": box,
                       "area": box[2] * box[3], "iscrowd": 0} for k, (n, box) in enumerate(BOXES.items())]
      + [{"id": 50, "image_id": 1, "category_id": A, "bbox": [100, 0, 20, 20], "area": 400, "iscrowd": 1}]}
RECORDS = {  # name: (score, class, box)
    "tp_A1": (0.95, A, [0, 0, 10, 10]),
    "background": (0.9, A, [200, 200, 10, 10]),
    "duplicate": (0.85, A, [0, 0, 10, 10.5]),
    "both": (0.8, A, [80, 0, 10, 3]),  # IoU 0.3 with B2 (other class), nothing of its class near
    "classification": (0.7, A, [20, 0, 10, 10]),  # on B1
    "localisation": (0.6, A, [40, 0, 10, 4]),  # IoU 0.4 with A2
    "tp_A3": (0.5, A, [60, 0, 10, 10]),
    "on_crowd": (0.97, A, [100, 0, 10, 10]),  # ignored, as COCO ignores it
    "image2_background": (0.3, B, [0, 0, 5, 5]),  # an image without GT
}
EXPECTED_COUNTS = {"classification": 1, "localisation": 1, "both": 1, "duplicate": 1, "background": 2,
                   "missed": 2}  # missed: A4 and B2


def _records(changes: dict[str, tuple | None] | None = None) -> list[dict]:
    out = []
    for name, (score, cls, box) in RECORDS.items():
        if changes and name in changes:
            if changes[name] is None:
                continue
            cls, box = changes[name]
        out.append({"image_id": 2 if name.startswith("image2") else 1, "category_id": cls, "bbox": box,
                    "score": score})
    return out


def _ap50(gt: dict, records: list[dict]) -> float:
    coco_gt = make_coco(copy.deepcopy(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(records)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * ev.stats[1]


def test_counts_and_dap_match_hand_fixed_cocoeval() -> None:
    result = error_breakdown(make_coco(copy.deepcopy(GT)), _records())
    errors = result["errors"]
    assert {k: v["count"] for k, v in errors.items()} == EXPECTED_COUNTS
    base = _ap50(GT, _records())
    assert result["AP50"] == pytest.approx(base, abs=1e-9)
    fixed = {
        "classification": _ap50(GT, _records({"classification": (B, BOXES["B1"])})),
        "localisation": _ap50(GT, _records({"localisation": (A, BOXES["A2"])})),
        "both": _ap50(GT, _records({"both": None})),
        "duplicate": _ap50(GT, _records({"duplicate": None})),
        "background": _ap50(GT, _records({"background": None, "image2_background": None})),
        "missed": _ap50({**GT, "annotations": [a for a in GT["annotations"] if a["id"] not in (4, 6)]}, _records()),
    }
    for kind, ap in fixed.items():
        assert errors[kind]["dAP"] == pytest.approx(ap - base, abs=1e-9), kind
        assert errors[kind]["dAP"] > 0, kind  # every error of this image costs AP: a real test of each fix


def test_no_detections_all_missed_and_chart(tmp_path: Path) -> None:
    result = error_breakdown(make_coco(copy.deepcopy(GT)), [])
    assert result["AP50"] == 0 and result["errors"]["missed"]["count"] == len(BOXES)
    assert result["errors"]["missed"]["dAP"] == 0  # a class left without GT boxes scores 0, as in TIDE
    (path,) = write_error_chart(error_breakdown(make_coco(copy.deepcopy(GT)), _records()), tmp_path)
    assert path.name == "error_breakdown.png" and path.stat().st_size > 1000
    assert write_error_chart(None, tmp_path / "none") == []


def test_eval_outputs_hold_the_breakdown_and_its_chart(tmp_path: Path) -> None:
    import json

    from conftest import COCO128

    from dinodet.data.coco import build_dataset
    from dinodet.engine.confusion import coco_confusion
    from dinodet.engine.eval_checkpoint import CheckpointEvaluation, check_eval_out, write_eval_outputs
    from dinodet.engine.evaluate import EvalResult
    from dinodet.errors import ConfigError
    from dinodet.files import dinodet_outputs

    dataset = build_dataset(COCO128, "train", train=False)
    anns = dataset.coco.dataset["annotations"]
    # every GT box found but the first, plus one detection of nothing
    records = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in anns[1:]]
    records.append({"image_id": anns[0]["image_id"], "category_id": anns[0]["category_id"],
                    "bbox": [0, 0, 2, 2], "score": 0.95})
    names = [dataset.coco.cats[c]["name"] for c in sorted(dataset.coco.getCatIds())]
    result = EvalResult(metrics={"AP": 0.9}, records=records,
                        confusion=coco_confusion(dataset.coco, records, names))
    evaluation = CheckpointEvaluation(result=result, dataset=dataset, split="train", checkpoint="x.pt",
                                      mode="exact", ema_weights=False)
    written = write_eval_outputs(evaluation, tmp_path, pictures=0)
    breakdown = json.loads((tmp_path / "metrics.json").read_text())["error_breakdown"]
    assert breakdown["errors"]["missed"]["count"] == 1 and breakdown["errors"]["background"]["count"] == 1
    assert breakdown["errors"]["missed"]["dAP"] > 0 and breakdown["errors"]["background"]["dAP"] > 0
    assert tmp_path / "error_breakdown.png" in written
    assert dinodet_outputs(tmp_path)["error_breakdown.png"] == "eval"
    other = tmp_path / "other"
    other.mkdir()
    (other / "error_breakdown.png").write_bytes(b"mine")  # a user's file of that name is never replaced
    with pytest.raises(ConfigError, match="error_breakdown.png"):
        check_eval_out(other)
