import math

import numpy as np
import pytest
import torch

from dinodet.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def random_xyxy(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.5
    return torch.cat([xy, xy + wh], dim=1)


def np_giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent float64 reference of the official formula (with its 1e-6 terms)."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            enc = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
            out[i, j] = inter / (union + 1e-6) - (enc - union) / (enc + 1e-6)
    return out


def test_conversions_round_trip_and_values():
    boxes = random_xyxy(50)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes, atol=1e-6)
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert torch.allclose(box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    assert torch.allclose(box_xyxy_to_xywh(torch.tensor([[10.0, 20.0, 40.0, 30.0]])), torch.tensor([[10.0, 20.0, 30.0, 10.0]]))
    # arbitrary leading dims
    batched = torch.rand(2, 3, 4)
    assert box_cxcywh_to_xyxy(batched).shape == (2, 3, 4)
    assert torch.allclose(box_area(torch.tensor([[1.0, 2.0, 4.0, 6.0]])), torch.tensor([12.0]))


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # intersection 1, union 7, enclosing box 3x3 = 9
    expected = 1 / (7 + 1e-6) - (9 - 7) / (9 + 1e-6)
    assert generalized_box_iou(a, b).item() == pytest.approx(expected, abs=1e-6)
    assert box_iou(a, b).item() == pytest.approx(1 / 7, abs=1e-6)


def test_giou_properties():
    a, b = random_xyxy(7, seed=1), random_xyxy(5, seed=2)
    g = generalized_box_iou(a, b)
    assert g.shape == (7, 5)
    assert torch.allclose(g, generalized_box_iou(b, a).T, atol=1e-7)  # symmetric
    assert (g <= 1).all() and (g >= -1).all()
    assert torch.allclose(torch.diag(generalized_box_iou(a, a)), torch.ones(7), atol=1e-4)  # identity
    assert (g <= box_iou(a, b) + 1e-7).all()  # GIoU <= IoU
    np.testing.assert_allclose(g.double().numpy(), np_giou(a.double().numpy(), b.double().numpy()), atol=1e-6)


def test_giou_disjoint_negative_and_iou_zero():
    a = torch.tensor([[0.0, 0.0, 0.1, 0.1]])
    b = torch.tensor([[0.5, 0.5, 0.6, 0.6]])
    assert generalized_box_iou(a, b).item() < 0
    assert box_iou(a, b).item() == 0


def test_giou_degenerate_boxes_match_official_formula():
    # zero-area boxes: the official eps terms make these finite instead of NaN
    boxes = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.5], [0.1, 0.1, 0.4, 0.4]])
    g = generalized_box_iou(boxes, boxes)
    assert torch.isfinite(g).all()
    assert g[0, 0].item() == 0.0  # identical points: iou 0/1e-6 = 0, enclosing 0 -> 0
    np.testing.assert_allclose(g.double().numpy(), np_giou(boxes.double().numpy(), boxes.double().numpy()), atol=1e-5)


def test_giou_empty():
    assert generalized_box_iou(torch.zeros(0, 4), random_xyxy(3)).shape == (0, 3)


def test_inverse_sigmoid_exact_formula():
    x = torch.tensor([-0.5, 0.0, 1e-4, 1e-3, 0.3, 0.5, 0.999, 0.9999, 1.0, 2.0])
    expected = [math.log(max(min(max(v, 0.0), 1.0), 1e-3) / max(1 - min(max(v, 0.0), 1.0), 1e-3)) for v in x.double().tolist()]
    np.testing.assert_allclose(inverse_sigmoid(x).numpy(), np.array(expected), rtol=1e-5, atol=1e-5)
    assert inverse_sigmoid(torch.tensor(0.5)).item() == 0.0
    assert inverse_sigmoid(torch.tensor(0.0)).item() == pytest.approx(math.log(1e-3), rel=1e-6)
    assert inverse_sigmoid(torch.tensor(1.0)).item() == pytest.approx(-math.log(1e-3), rel=1e-6)
    # bit-exact with the two-sided clamp the official helper uses
    x = torch.rand(1000)
    assert torch.equal(inverse_sigmoid(x), torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3)))


def test_inverse_sigmoid_round_trip_inside_range():
    x = torch.linspace(0.01, 0.99, 99)
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)


def test_paired_giou_is_the_diagonal_of_the_pairwise_giou():
    from dinodet.boxes import paired_generalized_box_iou

    a, b = random_xyxy(40, seed=3), random_xyxy(40, seed=4)  # many pairs are disjoint (GIoU < 0)
    a = torch.cat([a, torch.tensor([[0.2, 0.2, 0.2, 0.2]])])  # degenerate pair: official eps gives 0, not NaN
    b = torch.cat([b, torch.tensor([[0.2, 0.2, 0.2, 0.2]])])
    paired = paired_generalized_box_iou(a, b)
    assert (paired[:-1] < 0).any() and paired[-1].item() == 0.0
    assert torch.equal(paired, torch.diagonal(generalized_box_iou(a, b)))
