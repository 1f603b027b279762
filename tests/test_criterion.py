
import numpy as np
import pytest
import torch
from conftest import HOST_SYNC_OPS, NO_SHARED_REFERENCE, SHARED_REFERENCE, dispatched_ops

from dinodet.config import LossConfig
from dinodet.models.criterion import SetCriterion, _dn_indices, build_criterion
from dinodet.models.outputs import DenoisingMeta, DINOOutput

C = 5  # classes
Q = 6  # matching queries
L = 6  # decoder layers

FINAL = ["loss_ce", "class_error", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error"]
AUX = [n for n in FINAL if n != "class_error"]
DN = [f"{n}_dn" for n in AUX]


def official_names(num_layers: int) -> set[str]:
    names = set(FINAL) | set(DN) | {f"{n}_interm" for n in AUX}
    for i in range(num_layers - 1):
        names |= {f"{n}_{i}" for n in AUX + DN}
    return names


def make_targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


def make_output(targets, seed=0, num_groups=2, with_dn=True, num_layers=L, grad=False) -> DINOOutput:
    g = torch.Generator().manual_seed(seed)
    bs = len(targets)
    group_size = max(len(t["labels"]) for t in targets)
    meta = DenoisingMeta(num_groups=num_groups, group_size=group_size)
    pad = meta.pad_size

    def boxes(*shape):
        return torch.cat([torch.rand(*shape, 2, generator=g) * 0.6 + 0.2, torch.rand(*shape, 2, generator=g) * 0.3 + 0.05], -1)

    tensors = dict(
        logits=torch.randn(num_layers, bs, Q, C, generator=g),
        boxes=boxes(num_layers, bs, Q),
        interm_logits=torch.randn(bs, Q, C, generator=g),
        interm_boxes=boxes(bs, Q),
        dn_logits=torch.randn(num_layers, bs, pad, C, generator=g),
        dn_boxes=boxes(num_layers, bs, pad),
    )
    if grad:
        for t in tensors.values():
            t.requires_grad_(True)
    if not with_dn:
        tensors.update(dn_logits=None, dn_boxes=None)
    return DINOOutput(enc_topk_index=torch.zeros(bs, Q, dtype=torch.int64), dn_meta=meta if with_dn else None, **tensors)


def np_focal_sum(logits: np.ndarray, onehot: np.ndarray, alpha=0.25) -> float:
    p = 1 / (1 + np.exp(-logits))
    ce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    return float((alpha_t * (1 - p_t) ** 2 * ce).sum())


def np_giou(a: np.ndarray, b: np.ndarray) -> float:
    a = np.r_[a[:2] - a[2:] / 2, a[:2] + a[2:] / 2]
    b = np.r_[b[:2] - b[2:] / 2, b[:2] + b[2:] / 2]
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / (union + 1e-6) - (enc - union) / (enc + 1e-6)


def np_set_losses(logits, boxes, targets, pairs, num_boxes):
    """Independent reference of one prediction set; pairs[b] = [(query, target), ...]."""
    logits, boxes = logits.detach().double().numpy(), boxes.detach().double().numpy()
    onehot = np.zeros_like(logits)
    l1 = np.zeros(4)
    giou = 0.0
    correct = total = 0
    for b, (t, pb) in enumerate(zip(targets, pairs)):
        for q, j in pb:
            label = int(t["labels"][j])
            onehot[b, q, label] = 1
            tb = t["boxes"][j].double().numpy()
            l1 += np.abs(boxes[b, q] - tb)
            giou += 1 - np_giou(boxes[b, q], tb)
            correct += int(np.argmax(logits[b, q]) == label)
            total += 1
    card = np.mean([abs(int((np.argmax(logits[b], -1) != C - 1).sum()) - len(t["labels"])) for b, t in enumerate(targets)])
    return {
        "loss_ce": np_focal_sum(logits, onehot) / num_boxes,
        "class_error": 100 - (100.0 * correct / total if total else 0.0),
        "loss_bbox": l1.sum() / num_boxes,
        "loss_giou": giou / num_boxes,
        "loss_xy": l1[:2].sum() / num_boxes,
        "loss_hw": l1[2:].sum() / num_boxes,
        "cardinality_error": card,
    }


def pairs_of(indices):
    return [list(zip(q.tolist(), t.tolist())) for q, t in indices]


def test_exactly_the_official_names():
    targets = make_targets()
    crit = build_criterion(C, LossConfig())
    losses = crit(make_output(targets), targets)
    assert len(losses) == 79
    assert set(losses) == official_names(L)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in losses.values())
    # without denoising outputs (eval): same names, dn entries are zeros
    crit.eval()
    losses = crit(make_output(targets, with_dn=False), targets)
    assert set(losses) == official_names(L)
    assert all(losses[k].item() == 0 for k in losses if "_dn" in k)
    # different depth
    losses = build_criterion(C, LossConfig(), num_decoder_layers=3)(make_output(targets, num_layers=3), targets)
    assert set(losses) == official_names(3) and len(losses) == 7 + 6 + 2 * 12 + 6


def test_final_aux_and_interm_losses_match_numpy_reference():
    targets = make_targets()
    out = make_output(targets, seed=3)
    crit = build_criterion(C, LossConfig())
    losses = crit(out, targets)
    num_boxes = 3.0
    sets = [("", out.logits[-1], out.boxes[-1])] + [(f"_{i}", out.logits[i], out.boxes[i]) for i in range(L - 1)]
    sets.append(("_interm", out.interm_logits, out.interm_boxes))
    for suffix, logits, boxes in sets:
        indices = crit.matcher(logits, boxes, targets)
        ref = np_set_losses(logits, boxes, targets, pairs_of(indices), num_boxes)
        for name, value in ref.items():
            if name == "class_error" and suffix:
                assert "class_error" + suffix not in losses
                continue
            assert losses[name + suffix].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name + suffix


def test_dn_fixed_assignment_indices():
    targets = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([2, 2, 2])}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    idx = _dn_indices(targets, DenoisingMeta(num_groups=2, group_size=3), torch.device("cpu"))
    assert idx[0][0].tolist() == [0, 1, 6, 7] and idx[0][1].tolist() == [0, 1, 0, 1]
    assert idx[1][0].tolist() == [0, 1, 2, 6, 7, 8] and idx[1][1].tolist() == [0, 1, 2, 0, 1, 2]
    assert len(idx[2][0]) == 0 and idx[2][0].dtype == torch.int64


def test_dn_losses_match_numpy_reference():
    targets = make_targets()
    groups = 3
    out = make_output(targets, seed=5, num_groups=groups)
    losses = build_criterion(C, LossConfig())(out, targets)
    group_size = 2
    pairs = [[(g * 2 * group_size + j, j) for g in range(groups) for j in range(len(t["labels"]))] for t in targets]
    for suffix, layer in [("_dn", L - 1)] + [(f"_dn_{i}", i) for i in range(L - 1)]:
        ref = np_set_losses(out.dn_logits[layer], out.dn_boxes[layer], targets, pairs, 3.0 * groups)
        for name in AUX:
            key = name + suffix
            assert losses[key].item() == pytest.approx(ref[name], rel=1e-5, abs=1e-5), key


def test_dn_box_losses_only_see_positive_slots():
    targets = make_targets()
    out = make_output(targets, seed=1, num_groups=2)
    # put every positive slot exactly on its target
    for g in range(2):
        for b, t in enumerate(targets):
            n = len(t["labels"])
            out.dn_boxes[:, b, g * 4: g * 4 + n] = t["boxes"]
    crit = build_criterion(C, LossConfig())
    losses = crit(out, targets)
    assert losses["loss_bbox_dn"].item() == 0 and losses["loss_bbox_dn_2"].item() == 0
    assert losses["loss_giou_dn"].item() == pytest.approx(0, abs=1e-4)  # only the official 1e-6 eps
    # moving a negative slot (group 0, slot 2 = group_size + 0) changes nothing
    out.dn_boxes[-1, 0, 2] = torch.tensor([0.9, 0.9, 0.05, 0.05])
    assert crit(out, targets)["loss_bbox_dn"].item() == 0
    # moving a positive slot by 0.1 in cx costs 0.1 / (num_boxes * num_groups)
    out.dn_boxes[-1, 0, 4, 0] += 0.1
    assert crit(out, targets)["loss_bbox_dn"].item() == pytest.approx(0.1 / (3 * 2), rel=1e-4)


def test_dn_zero_when_eval_or_no_dn_or_no_targets():
    targets = make_targets()
    crit = build_criterion(C, LossConfig())
    out = make_output(targets)
    crit.eval()
    assert all(v.item() == 0 for k, v in crit(out, targets).items() if "_dn" in k)
    crit.train()
    assert crit(out, targets)["loss_ce_dn"].item() > 0
    out.dn_meta = DenoisingMeta(num_groups=1, group_size=0)  # batch without targets: pad size 0
    assert all(v.item() == 0 for k, v in crit(out, targets).items() if "_dn" in k)


def test_perfect_prediction():
    targets = make_targets()
    out = make_output(targets, seed=2)
    logits = torch.full_like(out.logits, -8.0)
    logits[..., C - 1] = -7.9  # unmatched queries' argmax is the last class (not counted as predictions)
    # queries 4 and 1 of image 0, query 0 of image 1 are exact, confident predictions in every layer
    for q, (b, j) in {4: (0, 0), 1: (0, 1), 0: (1, 0)}.items():
        out.boxes[:, b, q] = targets[b]["boxes"][j]
        logits[:, b, q, targets[b]["labels"][j]] = 8.0
        out.interm_boxes[b, q] = targets[b]["boxes"][j]
    out.logits = logits
    out.interm_logits = logits[0].clone()
    losses = build_criterion(C, LossConfig())(out, targets)
    for suffix in ["", "_0", "_4", "_interm"]:
        assert losses["loss_bbox" + suffix].item() == pytest.approx(0, abs=1e-6)
        assert losses["loss_giou" + suffix].item() == pytest.approx(0, abs=1e-4)
        assert losses["loss_ce" + suffix].item() < 1e-4
    assert losses["class_error"].item() == 0
    # image 0: 2 non-'last class' queries for 2 targets; image 1: class 4 is the last class -> 0 vs 1
    assert losses["cardinality_error"].item() == pytest.approx((0 + 1) / 2)


def test_class_error_and_empty_batch():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = make_output(make_targets(), with_dn=False)
    losses = build_criterion(C, LossConfig())(out, targets)
    assert set(losses) == official_names(L)
    assert losses["class_error"].item() == 100  # official accuracy() returns 0 when nothing is matched
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # all-negative focal loss normalised by num_boxes clamped to 1
    onehot = np.zeros(out.logits[-1].shape)
    assert losses["loss_ce"].item() == pytest.approx(np_focal_sum(out.logits[-1].double().numpy(), onehot), rel=1e-5)


def test_weight_dict_and_total_loss():
    cfg = LossConfig(interm_loss_coef=0.5)
    crit = build_criterion(C, cfg)
    w = crit.weight_dict
    assert len(w) == 6 + 5 * 6 + 3
    assert w["loss_ce"] == 1.0 and w["loss_bbox"] == 5.0 and w["loss_giou"] == 2.0
    assert w["loss_bbox_dn"] == 5.0 and w["loss_giou_dn_4"] == 2.0 and w["loss_ce_3"] == 1.0
    assert w["loss_bbox_interm"] == 2.5 and w["loss_ce_interm"] == 0.5
    assert not any(k.startswith(("class_error", "cardinality", "loss_xy", "loss_hw")) for k in w)

    targets = make_targets()
    out = make_output(targets, grad=True)
    losses = crit(out, targets)
    expected = sum(v.item() * w[k] for k, v in losses.items() if k in w)
    total = crit.total_loss(losses)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    for t in (out.logits, out.boxes, out.interm_logits, out.interm_boxes, out.dn_logits, out.dn_boxes):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert not losses["loss_xy"].requires_grad and not losses["cardinality_error"].requires_grad
    assert not losses["class_error"].requires_grad

    # a depth that does not match num_decoder_layers must not be silently dropped
    short = SetCriterion(C, crit.matcher, cfg, num_decoder_layers=3)
    with pytest.raises(KeyError):
        short.total_loss(losses)


def test_aux_layers_use_their_own_predictions():
    targets = make_targets()
    out = make_output(targets, seed=7)
    crit = build_criterion(C, LossConfig())
    before = crit(out, targets)
    out.boxes[2] = out.boxes[2] * 0.5 + 0.25  # only layer 2 changes
    after = crit(out, targets)
    assert after["loss_bbox_2"].item() != before["loss_bbox_2"].item()
    for k in before:
        if not k.endswith("_2"):
            assert after[k].item() == before[k].item(), k


# ---------------------------------------------------------------- against official numbers (if available)

FIXTURES = sorted(SHARED_REFERENCE.glob("fixture_*_seed*[0-9].pt")) if SHARED_REFERENCE.is_dir() else []


@pytest.mark.skipif(not FIXTURES, reason=NO_SHARED_REFERENCE)
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_matching_losses_reproduce_official_train_losses(path):
    """With zero-noise denoising, the official train pass gives the matching queries exactly the eval-mode
    outputs (denoising queries are masked from them), so the criterion fed with the stored official eval
    outputs must reproduce every non-denoising official train loss, and the official loss_total from the
    official loss dict."""
    fx = torch.load(path, weights_only=True)
    ev, train, tol = fx["expected"]["eval"], fx["expected"]["train"], fx["tolerances"]["losses"]
    out = DINOOutput(
        logits=torch.cat([ev["aux_logits"], ev["pred_logits"][None]]),
        boxes=torch.cat([ev["aux_boxes"], ev["pred_boxes"][None]]),
        interm_logits=ev["interm_logits"],
        interm_boxes=ev["interm_boxes"],
        enc_topk_index=ev["enc_topk_index"],
    )
    crit = build_criterion(91, LossConfig(), num_decoder_layers=fx["num_dec_layers"])
    losses = crit(out, fx["inputs"]["targets"])
    assert list(losses) == list(train["losses"])  # same names, same order
    for name, ref in train["losses"].items():
        if "_dn" not in name:
            assert abs(losses[name].item() - ref.item()) <= tol[name], name
    # the weighted sum is one stacked reduction (another float32 summation order than the official loop)
    torch.testing.assert_close(crit.total_loss(train["losses"]), train["loss_total"], rtol=1e-6, atol=0)


def test_loss_and_backward_copy_to_the_host_once():
    """The only host round trip of a training loss is the matcher's: one copy of all cost matrices,
    whose finiteness is then checked on the host (the single value read below); the losses of all
    sets and their backward read nothing back."""
    crit = build_criterion(C, LossConfig())
    targets = make_targets()
    out = make_output(targets, grad=True)
    with dispatched_ops() as ops:
        losses = crit(out, targets)
        crit.total_loss(losses).backward()
    assert out.logits.grad is not None
    syncs = {k: n for k, n in ops.items() if k in HOST_SYNC_OPS}
    assert syncs == {"_local_scalar_dense": 1}, syncs


# loss.aux_loss=false: only the last decoder layer (and the proposals) are matched and weighted
def test_without_aux_loss_only_the_last_layer_counts():
    from test_criterion import C, make_output, make_targets, np_set_losses, pairs_of

    from dinodet.config import LossConfig
    from dinodet.models.criterion import build_criterion

    targets = make_targets()
    out = make_output(targets, seed=3)
    crit = build_criterion(C, LossConfig(aux_loss=False))
    losses = crit(out, targets)
    assert not any(k.rsplit("_", 1)[-1].isdigit() for k in list(losses) + list(crit.weight_dict))
    assert set(crit.weight_dict) <= set(losses)
    pairs = pairs_of(crit.matcher(out.logits[-1], out.boxes[-1], targets))
    for name, value in np_set_losses(out.logits[-1], out.boxes[-1], targets, pairs, 3.0).items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name
