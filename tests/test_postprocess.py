import math

import pytest
import torch
from conftest import NO_SHARED_REFERENCE, SHARED_REFERENCE

from dinodet.models.postprocess import Detections, postprocess


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_hand_computed_example():
    # 1 image, 2 queries, 3 classes; scores chosen so that query 1 gives two of the top 3
    probs = [[0.10, 0.80, 0.20], [0.70, 0.05, 0.90]]
    logits = torch.tensor([[[logit(p) for p in row] for row in probs]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.1]]])
    dets = postprocess(logits, boxes, torch.tensor([[100, 200]]), num_select=3)  # h=100, w=200
    assert isinstance(dets, Detections)
    torch.testing.assert_close(dets.scores, torch.tensor([[0.90, 0.80, 0.70]]))
    assert dets.labels.dtype == torch.int64
    assert dets.labels.tolist() == [[2, 1, 0]]
    box_q0 = [(0.5 - 0.1) * 200, (0.5 - 0.2) * 100, (0.5 + 0.1) * 200, (0.5 + 0.2) * 100]
    box_q1 = [(0.25 - 0.25) * 200, (0.75 - 0.05) * 100, (0.25 + 0.25) * 200, (0.75 + 0.05) * 100]
    torch.testing.assert_close(dets.boxes, torch.tensor([[box_q1, box_q0, box_q1]]))


def test_batch_shapes_scaling_and_no_clamp():
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 4)
    boxes = torch.rand(2, 10, 4)
    boxes[1, :, 0], boxes[1, :, 2:] = 0.5, 1.5  # boxes sticking out of the image stay unclamped
    sizes = torch.tensor([[480, 640], [300, 200]])
    dets = postprocess(logits, boxes, sizes, num_select=7)
    assert dets.scores.shape == (2, 7) and dets.labels.shape == (2, 7) and dets.boxes.shape == (2, 7, 4)
    assert (dets.scores[:, :-1] >= dets.scores[:, 1:]).all()
    assert (dets.boxes[1, :, 0] < 0).all()
    flat = logits.sigmoid().view(2, -1)
    for b in range(2):
        q = torch.topk(flat[b], 7).indices // 4
        h, w = sizes[b].tolist()
        cx, cy, bw, bh = boxes[b, q].unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(dets.boxes[b], expected)


def test_num_select_larger_than_candidates():
    dets = postprocess(torch.randn(1, 2, 3), torch.rand(1, 2, 4), torch.tensor([[10, 10]]), num_select=300)
    assert dets.scores.shape == (1, 6)


FIXTURES = sorted(SHARED_REFERENCE.glob("fixture_*_seed*[0-9].pt")) if SHARED_REFERENCE.is_dir() else []


@pytest.mark.skipif(not FIXTURES, reason=NO_SHARED_REFERENCE)
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_bitwise_equal_to_official_postprocess(path):
    fx = torch.load(path, weights_only=True)
    ev = fx["expected"]["eval"]
    dets = postprocess(ev["pred_logits"], ev["pred_boxes"], fx["inputs"]["orig_sizes"], fx["inputs"]["num_select"])
    assert torch.equal(dets.scores, ev["scores"])
    assert torch.equal(dets.labels, ev["labels"])
    assert torch.equal(dets.boxes, ev["boxes"])


def test_default_num_select_is_the_official_300():
    dets = postprocess(torch.randn(1, 100, 5), torch.rand(1, 100, 4), torch.tensor([[10, 10]]))
    assert dets.scores.shape == (1, 300) and dets.boxes.shape == (1, 300, 4)
