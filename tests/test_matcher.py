import itertools

import numpy as np
import pytest
import torch

from dinodet.models.matcher import HungarianMatcher


def np_cost(logits, boxes, labels, tboxes, w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25):
    """Independent float64 matching cost for one image: [Q, C], [Q, 4], [n], [n, 4] -> [Q, n]."""
    p = 1 / (1 + np.exp(-logits))
    q_n, n = len(logits), len(labels)
    cost = np.zeros((q_n, n))
    for i in range(q_n):
        for j in range(n):
            pc = p[i, labels[j]]
            pos = alpha * (1 - pc) ** 2 * -np.log(pc + 1e-8)
            neg = (1 - alpha) * pc**2 * -np.log(1 - pc + 1e-8)
            l1 = np.abs(boxes[i] - tboxes[j]).sum()
            a = np.r_[boxes[i][:2] - boxes[i][2:] / 2, boxes[i][:2] + boxes[i][2:] / 2]
            b = np.r_[tboxes[j][:2] - tboxes[j][2:] / 2, tboxes[j][:2] + tboxes[j][2:] / 2]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou = inter / (union + 1e-6) - (enc - union) / (enc + 1e-6)
            cost[i, j] = w_bbox * l1 + w_class * (pos - neg) - w_giou * giou
    return cost


def make_batch(sizes, num_queries, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sizes), num_queries, num_classes, generator=g) * 2
    boxes = torch.cat([torch.rand(len(sizes), num_queries, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(len(sizes), num_queries, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for n in sizes:
        targets.append({
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1),
        })
    return logits, boxes, targets


def test_cost_matrix_equals_hand_computed_cost():
    logits, boxes, targets = make_batch([3, 2], 6, 5, seed=0)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    cost = matcher.cost_matrix(logits, boxes, targets)
    assert cost.shape == (2, 6, 5)  # every image against all 5 targets of the batch
    offset = 0
    for b, t in enumerate(targets):
        n = len(t["labels"])
        ref = np_cost(logits[b].double().numpy(), boxes[b].double().numpy(), t["labels"].numpy(), t["boxes"].double().numpy())
        np.testing.assert_allclose(cost[b, :, offset:offset + n].numpy(), ref, rtol=1e-5, atol=1e-5)
        offset += n


@pytest.mark.parametrize("seed", range(8))
def test_assignment_is_optimal_vs_brute_force(seed):
    sizes = [3, 1, 2]
    num_queries = 5
    logits, boxes, targets = make_batch(sizes, num_queries, 4, seed)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    matches = matcher(logits, boxes, targets)
    for b, (t, (q_idx, t_idx)) in enumerate(zip(targets, matches)):
        n = len(t["labels"])
        assert q_idx.dtype == torch.int64 and t_idx.dtype == torch.int64
        assert len(q_idx) == len(t_idx) == n
        assert sorted(t_idx.tolist()) == list(range(n))
        assert len(set(q_idx.tolist())) == n
        cost = np_cost(logits[b].double().numpy(), boxes[b].double().numpy(), t["labels"].numpy(), t["boxes"].double().numpy())
        best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(num_queries), n))
        got = sum(cost[q, j] for q, j in zip(q_idx.tolist(), t_idx.tolist()))
        assert got == pytest.approx(best, abs=1e-4)


def test_zero_target_images():
    logits, boxes, targets = make_batch([0, 2, 0], 4, 3, seed=1)
    matches = HungarianMatcher(2.0, 5.0, 2.0)(logits, boxes, targets)
    assert [len(q) for q, _ in matches] == [0, 2, 0]
    assert matches[0][0].dtype == torch.int64
    # a batch without any target at all (the official code would crash on this)
    logits, boxes, targets = make_batch([0, 0], 4, 3, seed=2)
    matches = HungarianMatcher(2.0, 5.0, 2.0)(logits, boxes, targets)
    assert all(len(q) == 0 and len(t) == 0 and q.dtype == torch.int64 for q, t in matches)


def test_more_targets_than_queries():
    logits, boxes, targets = make_batch([4], 2, 3, seed=3)
    q_idx, t_idx = HungarianMatcher(2.0, 5.0, 2.0)(logits, boxes, targets)[0]
    assert len(q_idx) == len(t_idx) == 2
    assert sorted(q_idx.tolist()) == [0, 1]


def test_obvious_assignment():
    # query 2 sits exactly on target 0, query 0 exactly on target 1, and predicts their classes
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.9, 0.9, 0.05, 0.05], [0.7, 0.6, 0.1, 0.3]]])
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 0] = 5.0
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.7, 0.6, 0.1, 0.3], [0.3, 0.3, 0.2, 0.2]])}]
    q_idx, t_idx = HungarianMatcher(2.0, 5.0, 2.0)(logits, boxes, targets)[0]
    assert dict(zip(q_idx.tolist(), t_idx.tolist())) == {0: 1, 2: 0}


def test_no_grad_and_invalid_costs():
    logits, boxes, targets = make_batch([2], 3, 3, seed=4)
    logits.requires_grad_(True)
    assert not HungarianMatcher().cost_matrix(logits, boxes, targets).requires_grad
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


def test_match_sets_equals_matching_each_set_alone():
    sets_and_targets = [make_batch([3, 0, 5], 6, 4, seed=s) for s in (5, 6, 7)]
    targets = sets_and_targets[0][2]
    sets = [(logits, boxes) for logits, boxes, _ in sets_and_targets]
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    together = matcher.match_sets(sets, targets)
    assert len(together) == 3
    for (logits, boxes), got in zip(sets, together):
        alone = matcher(logits, boxes, targets)
        assert [(q.tolist(), t.tolist()) for q, t in got] == [(q.tolist(), t.tolist()) for q, t in alone]
    # sets of different query counts (e.g. encoder proposals vs decoder queries) and no targets at all
    short = make_batch([3, 0, 5], 2, 4, seed=8)[:2]
    assert [len(q) for q, _ in matcher.match_sets([sets[0], short], targets)[1]] == [2, 0, 2]
    empty = make_batch([0, 0], 4, 3, seed=9)
    none = matcher.match_sets([empty[:2]] * 2, empty[2])
    assert len(none) == 2 and all(len(m) == 2 and len(q) == len(t) == 0 for m in none for q, t in m)


def test_nan_predictions_are_a_clear_error():
    from dinodet.models.matcher import NonFiniteCostError

    logits, boxes, targets = make_batch([2], 3, 3, seed=10)
    boxes[0, 1, 0] = float("nan")
    with pytest.raises(NonFiniteCostError, match="not finite"):
        HungarianMatcher()(logits, boxes, targets)


def test_saturated_probabilities_keep_the_official_log_guard():
    # sigmoid(-200) and sigmoid(200) are exactly 0 and 1 in float32: the +1e-8 inside the logs keeps
    # the cost finite (and equal to the official value) instead of raising NonFiniteCostError
    logits, boxes, targets = make_batch([2], 3, 3, seed=11)
    logits[0, :, :] = -200.0
    logits[0, 1, :] = 200.0
    cost = HungarianMatcher(2.0, 5.0, 2.0).cost_matrix(logits, boxes, targets)
    assert torch.isfinite(cost).all()
    ref = np_cost(logits[0].double().numpy(), boxes[0].double().numpy(), targets[0]["labels"].numpy(),
                  targets[0]["boxes"].double().numpy())
    np.testing.assert_allclose(cost[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert len(HungarianMatcher()(logits, boxes, targets)[0][0]) == 2


def test_default_costs_are_the_official_ones():
    m = HungarianMatcher()
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal_alpha, m.gamma) == (2.0, 5.0, 2.0, 0.25, 2.0)
