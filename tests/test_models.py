"""Model-level behaviour on the tiny preset: shapes, masks, denoising layout, hooks."""
import math

import pytest
import torch
from conftest import HOST_SYNC_OPS, dispatched_ops

from dinodet.data.transforms import pad_batch
from dinodet.models.attention import MultiScaleDeformableAttention, configure_msda
from dinodet.models.denoising import denoising_attn_mask, num_denoising_groups
from dinodet.models.dino import DINO
from dinodet.models.position import SinePositionEncoding, box_sine_embedding
from dinodet.models.query_selection import encoder_proposals
from dinodet.presets import get_preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = DINO(cfg.model).eval()
    configure_msda(model, "cpu")  # as an inference mode does: embedding_bag
    return cfg, model


def _batch(sizes):
    g = torch.Generator().manual_seed(1)
    return pad_batch([torch.randn(3, h, w, generator=g) for h, w in sizes])


def test_eval_output_shapes(tiny):
    cfg, model = tiny
    images, mask = _batch([(96, 130), (77, 64)])
    with torch.no_grad():
        out = model(images, mask)
    m = cfg.model
    assert out.logits.shape == (m.dec_layers, 2, m.num_queries, m.num_classes)
    assert out.boxes.shape == (m.dec_layers, 2, m.num_queries, 4)
    assert out.interm_logits.shape == (2, m.num_queries, m.num_classes)
    assert out.enc_topk_index.shape == (2, m.num_queries)
    assert out.dn_meta is None and out.dn_logits is None
    assert torch.isfinite(out.logits).all()
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()


def test_backbone_masks_follow_padding(tiny):
    _, model = tiny
    images, mask = _batch([(64, 64), (33, 17)])
    feats = model.backbone(images, mask)
    assert [f.shape[-1] for f, _ in feats] == [8, 4, 2]
    _, m8 = feats[0]
    assert not m8[0].any()
    # image 1 covers 33x17 of 64x64: at stride 8 rows >= 5 and cols >= 3 are padding (nearest resize)
    assert m8[1, 5:, :].all() and m8[1, :, 3:].all() and not m8[1, :4, :2].any()


def test_tiny_image_fewer_tokens_than_queries(tiny):
    _, model = tiny
    images, mask = _batch([(40, 40)])  # 5x5 + 3x3 + 2x2 + 1x1 = 39 tokens < 60 queries
    with torch.no_grad():
        out = model(images, mask)
    assert out.logits.shape[2] == 39
    assert torch.isfinite(out.pred_logits).all()


def test_positional_encoding_is_normalised_to_valid_region():
    pe = SinePositionEncoding(8, 20, 20)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 3:] = True
    pos = pe(mask)
    assert pos.shape == (1, 4, 6, 16)  # channels last: y features, then x features
    # last valid column has x = 2*pi: sin(2*pi/1) of the first x channel is ~0
    assert abs(pos[0, 0, 2, 8].item()) < 1e-5
    # identical rows inside the valid region
    assert torch.allclose(pos[0, 0, :3, 8:], pos[0, 3, :3, 8:])


def test_sine_encodings_interleave_sin_and_cos_exactly():
    """Even channels sin, odd channels cos: bit-identical to the official slice-and-stack form."""
    def official(p):
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    mask = torch.zeros(2, 13, 19, dtype=torch.bool)
    mask[1, 9:] = True
    mask[1, :, 11:] = True
    pe = SinePositionEncoding(128, 20, 20)
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    freqs = 20 ** (2 * (torch.arange(128) // 2) / 128)
    assert torch.equal(pe(mask)[..., :128], official(y[..., None] / freqs))

    boxes = torch.rand(2, 50, 4)
    emb = box_sine_embedding(boxes, 128)
    assert emb.shape == (2, 50, 512)
    freqs = 10000 ** (2 * (torch.arange(128) // 2) / 128)
    y_part = official((boxes[..., 1] * 2 * math.pi)[..., None] / freqs)  # (y, x, w, h) order
    assert torch.equal(emb[..., :128], y_part)


def test_encoder_proposals_invalid_tokens_are_inf():
    mask = torch.zeros(1, 3 * 4, dtype=torch.bool)
    mask.view(1, 3, 4)[:, :, 3] = True
    props, valid = encoder_proposals(mask, [(3, 4)], 0.05)
    assert torch.isinf(props.view(1, 3, 4, 4)[0, :, 3]).all()
    assert valid.view(3, 4)[:, :3].all() and not valid.view(3, 4)[:, 3].any()
    centre = props[0, 0].sigmoid()
    assert torch.allclose(centre, torch.tensor([0.5 / 3, 0.5 / 3, 0.05, 0.05]))


def test_denoising_group_rule_matches_official():
    assert num_denoising_groups(100, 7) == 200 // 14
    assert num_denoising_groups(100, 0) == 1
    assert num_denoising_groups(100, 150) == 1
    assert num_denoising_groups(20, 3) == 40  # official quirk: below 100 queries the count is not divided


def test_denoising_attention_mask_layout():
    m = denoising_attn_mask(num_groups=3, group_size=2, num_queries=5)
    pad = 12
    assert m.shape == (17, 17)
    assert m[pad:, :pad].all() and not m[pad:, pad:].any()  # matching queries never see denoising
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert not m[rows, 4 * g: 4 * g + 4].any()  # own group visible
        assert not m[rows, pad:].any()  # matching part visible
        others = torch.ones(pad, dtype=torch.bool)
        others[4 * g: 4 * g + 4] = False
        assert m[rows][:, :pad][:, others].all()


def test_denoising_noise_statistics_without_host_syncs():
    """Label noise flips ~ratio/2 of the labels, positives stay within box_noise_scale * half size of
    their box and negatives beyond it; and no op that waits for the device (nonzero, .item(), boolean
    indexing) is dispatched while building the queries."""
    from dinodet.models.denoising import ContrastiveDenoising

    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=91, labelbook_size=91, hidden_dim=8, dn_number=100)
    n = 50
    targets = [{"labels": torch.full((n,), 3), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(n, 1)}]
    with dispatched_ops() as ops:
        q = dn(targets, num_queries=10)
    assert not HOST_SYNC_OPS & set(ops), ops
    groups, size = q.meta.num_groups, q.meta.group_size
    assert (groups, size) == (2, n)
    kept = (q.content[0] == dn.label_embed.weight[3]).all(-1)  # [P] label still 3
    changed = (~kept).sum().item()
    assert 0.25 * 0.5 * 4 * n < changed < 0.25 * 2 * 4 * n  # expected 0.25 * 90/91 of 200 draws
    boxes = q.anchors_unsig[0].sigmoid()
    corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    shift = (corners - torch.tensor([0.4, 0.3, 0.6, 0.7])).abs() / torch.tensor([0.1, 0.2, 0.1, 0.2])  # / half size
    slots = torch.arange(2 * groups * size)
    negative = (slots // size) % 2 == 1
    assert shift[~negative].max() <= 0.4 + 1e-4 and shift[negative].min() >= 0.4 - 1e-4


def test_training_forward_with_denoising_and_zero_noise(tiny):
    cfg, model = tiny
    model = DINO(cfg.model)
    model.load_state_dict(tiny[1].state_dict())
    model.denoising.label_noise_ratio = 0.0
    model.denoising.box_noise_scale = 0.0
    images, mask = _batch([(96, 128), (80, 64)])
    targets = [
        {"labels": torch.tensor([1, 5, 7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.5, 0.5]])},
    ]
    model.train()
    out = model(images, mask, targets)
    meta = out.dn_meta
    assert meta.group_size == 3 and meta.num_groups == num_denoising_groups(cfg.model.dn_number, 3)
    assert out.dn_logits.shape[2] == meta.pad_size
    # denoising queries are hidden from the matching queries: matching outputs equal eval outputs
    model.eval()
    with torch.no_grad():
        ref = model(images, mask, enc_topk_index=out.enc_topk_index)
    torch.testing.assert_close(out.logits.detach(), ref.logits, rtol=1e-4, atol=1e-4)
    # with zero noise the first decoder layer starts exactly at the ground-truth boxes
    model.train()
    captured = {}
    def keep_refs(module, inputs, output):
        captured["refs"] = output[1]

    h = model.decoder.register_forward_hook(keep_refs)
    model(images, mask, targets)
    h.remove()
    start = captured["refs"][0]
    torch.testing.assert_close(start[0, :3], targets[0]["boxes"], atol=1e-6, rtol=0)
    torch.testing.assert_close(start[1, 0], targets[1]["boxes"][0], atol=1e-6, rtol=0)
    assert torch.equal(start[1, 1:3], torch.full((2, 4), 0.5))  # unused padding slots sit at sigmoid(0)


def test_forward_passes_never_wait_for_the_device(tiny):
    """Inference (model + post-processing) and the training forward (with denoising) dispatch no op
    that reads a value back or has a data-dependent shape, and build no tensor from host data once
    the per-size constants are cached ("lift_fresh": on a GPU a blocking host-to-device copy), so on
    a GPU the host queues a whole forward without waiting.  Padding makes the masks non-trivial."""
    from dinodet.models.postprocess import postprocess

    cfg, model = tiny
    images, mask = _batch([(96, 128), (80, 64)])
    orig_sizes = torch.tensor([[96, 128], [80, 64]])
    with torch.no_grad():
        model(images, mask)  # caches this image size's constants
        with dispatched_ops() as ops:
            out = model(images, mask)
            postprocess(out.logits[-1], out.boxes[-1], orig_sizes, num_select=50)
    assert ops["topk"] and not (HOST_SYNC_OPS | {"lift_fresh"}) & set(ops), ops
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.5, 0.5]])}]
    train_model = DINO(cfg.model).train()
    with dispatched_ops() as ops:
        out = train_model(images, mask, targets)
    assert out.dn_logits is not None and not (HOST_SYNC_OPS | {"lift_fresh"}) & set(ops), ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU check is the test above)")
def test_cuda_forward_and_loss_synchronize_only_for_the_matching(tiny):
    """The same on a GPU, with CUDA's own sync detector: after a warm-up, an inference forward with
    post-processing and a training forward never make the host wait, and the loss waits once (the
    matcher's copy of the cost matrices to the host)."""
    import copy
    import warnings

    from dinodet.models.criterion import build_criterion
    from dinodet.models.postprocess import postprocess

    cfg, model = tiny
    dev = torch.device("cuda")
    model = copy.deepcopy(model).to(dev)
    configure_msda(model, dev, needs_grad=True)  # the Triton kernel
    criterion = build_criterion(cfg.model.num_classes, cfg.loss, cfg.model.dec_layers).to(dev)
    images, mask = (t.to(dev) for t in _batch([(96, 128), (80, 64)]))
    orig_sizes = torch.tensor([[96, 128], [80, 64]], device=dev)
    targets = [{"labels": torch.tensor([1, 5], device=dev),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]], device=dev)},
               {"labels": torch.tensor([2], device=dev), "boxes": torch.tensor([[0.4, 0.5, 0.5, 0.5]], device=dev)}]

    def step():
        model.eval()
        with torch.no_grad():
            out = model(images, mask)
            postprocess(out.logits[-1], out.boxes[-1], orig_sizes, num_select=50)
        model.train()
        return model(images, mask, targets)

    criterion(step(), targets)  # warm-up: per-size constants, cuDNN, Triton compilation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = step()
            forward = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            criterion(out, targets)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    loss = [str(w.message) for w in caught if "synchroniz" in str(w.message)][len(forward):]
    assert not forward, forward
    assert len(loss) == 1, loss


def test_a_bare_model_requests_the_configs_msda_backend_and_runs_the_reference(tiny, caplog, monkeypatch):
    """Construction only records ``model.msda_backend`` (no warning for a CUDA-only request on a CPU
    machine); the reference runs on any device until ``configure_msda`` resolves the request."""
    from dinodet.config import apply_overrides

    cfg, configured = tiny
    monkeypatch.delenv("DINODET_MSDA", raising=False)
    assert {m.backend for m in configured.modules() if isinstance(m, MultiScaleDeformableAttention)} == {
        "embedding_bag"}
    with caplog.at_level("WARNING", logger="dinodet"):
        model = DINO(apply_overrides(cfg, ['model.msda_backend="triton"']).model).eval()
    assert not caplog.records
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert {(m.msda_backend, m.backend) for m in attentions} == {("triton", "pytorch")}
    with torch.no_grad():
        model(*_batch([(64, 80)]))
    assert configure_msda(model, "cpu", override="gather") == "gather"
    assert configure_msda(model, "cpu") == "pytorch"  # the request, not the last override: triton cannot run here


def test_enc_topk_override_is_used(tiny):
    _, model = tiny
    images, mask = _batch([(64, 64)])
    with torch.no_grad():
        base = model(images, mask)
        flipped = base.enc_topk_index.flip(1)
        out = model(images, mask, enc_topk_index=flipped)
    assert torch.equal(out.enc_topk_index, base.enc_topk_index)  # own selection still reported
    torch.testing.assert_close(out.interm_logits, base.interm_logits.flip(1))


def test_frozen_stages_get_no_gradient():
    cfg = get_preset("dino_r50_4scale")
    from dinodet.models.backbones.resnet import ResNetBackbone
    bb = ResNetBackbone("resnet50", (1, 2, 3), freeze_at=cfg.model.backbone.freeze_at)
    trainable = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_denoising_group_rule_boundary_at_100_queries():
    # official: `if dn_number * 2 >= 100: groups = dn_number * 2 // (2 * max_targets)`, so 50 is divided
    assert num_denoising_groups(50, 7) == 100 // 14
    assert num_denoising_groups(49, 7) == 98


def test_denoising_label_noise_rate_and_classes():
    """label_noise_ratio r: each label is redrawn with probability r / 2, uniformly over ALL classes."""
    from dinodet.models.denoising import ContrastiveDenoising

    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=4, labelbook_size=4, hidden_dim=8, dn_number=100,
                              label_noise_ratio=0.4, box_noise_scale=0.0)
    n = 500  # one group: 2 * 500 = 1000 draws
    q = dn([{"labels": torch.zeros(n, dtype=torch.long), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(n, 1)}],
           num_queries=10)
    rows = q.content[0]  # [1000, 8]
    match = (rows[:, None] == dn.label_embed.weight[None]).all(-1)  # [1000, 5]
    assert (match.sum(1) == 1).all()
    counts = match.sum(0)
    changed = rows.shape[0] - counts[0].item()
    assert 110 < changed < 190  # expected 1000 * 0.2 * 3/4 = 150 (sd ~11)
    assert (counts[1:4] > 20).all() and counts[4] == 0  # every other class, the last one included


def test_denoising_box_noise_is_two_sided_and_clamped_to_the_image():
    from dinodet.models.denoising import ContrastiveDenoising

    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=91, labelbook_size=91, hidden_dim=8, dn_number=100,
                              label_noise_ratio=0.0, box_noise_scale=1.0)
    n = 50
    centre = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(n, 1)
    corner = torch.tensor([[0.05, 0.96, 0.1, 0.08]]).repeat(n, 1)  # touches the left and bottom borders
    q = dn([{"labels": torch.zeros(n, dtype=torch.long), "boxes": centre},
            {"labels": torch.zeros(n, dtype=torch.long), "boxes": corner}], num_queries=10)
    boxes = q.anchors_unsig.sigmoid()
    corners = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    assert (corners >= -1e-3).all() and (corners <= 1 + 1e-3).all()  # noised in xyxy, then clamped to [0, 1]
    shift = corners[0] - torch.tensor([0.4, 0.3, 0.6, 0.7])
    moved_down = (shift < 0).float().mean().item()
    assert 0.35 < moved_down < 0.65  # random sign: about half the corners move each way


def test_encoder_proposals_use_valid_width_and_height_and_both_bounds():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, 3:, :] = True  # valid height 3
    mask[:, :, 5:] = True  # valid width 5
    wide = torch.zeros(1, 1, 100, dtype=torch.bool)  # a 1 x 100 map: cx = 0.005 ... 0.995
    props, valid = encoder_proposals(torch.cat([mask.flatten(1), wide.flatten(1)], 1), [(4, 8), (1, 100)], 0.05)
    first = props[0, :32].view(4, 8, 4)
    torch.testing.assert_close(first[1, 3].sigmoid(), torch.tensor([3.5 / 5, 1.5 / 3, 0.05, 0.05]))
    torch.testing.assert_close(first[2, 0].sigmoid(), torch.tensor([0.5 / 5, 2.5 / 3, 0.05, 0.05]))
    row = valid[0, 32:, 0]
    assert not row[0] and not row[99] and row[1:99].all()  # (0.01, 0.99) is open on both sides
    assert torch.isinf(props[0, 32]).all() and torch.isinf(props[0, 131]).all()


def test_query_selection_ranking_gradients_and_padding():
    from dinodet.models.query_selection import QuerySelection

    torch.manual_seed(0)
    qs = QuerySelection(d_model=16, num_classes=5, num_queries=30)  # more queries than the 20 tokens
    shapes = [(4, 4), (2, 2)]
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, :16].view(4, 4)[:, 3] = True
    mask[0, 16:].view(2, 2)[:, 1] = True
    memory = torch.randn(1, 20, 16)
    other = memory.clone()
    other[mask] = 50 * torch.randn(int(mask.sum()), 16)  # padded tokens' content must not matter
    a, b = qs(memory, mask, shapes), qs(other, mask, shapes)
    assert torch.equal(a.own_topk_index, b.own_topk_index) and torch.equal(a.interm_logits, b.interm_logits)
    assert torch.equal(a.anchors_unsig, b.anchors_unsig)
    # ranked by the best class logit of each token; content queries are the first Q rows
    best = a.interm_logits[0].max(-1).values
    assert (best[:-1] >= best[1:]).all()
    assert torch.equal(a.content[0], qs.content_queries.weight[:20])
    # anchors are detached, the encoder-head boxes keep their gradient
    assert not a.anchors_unsig.requires_grad and a.interm_boxes.requires_grad
    a.interm_boxes.sum().backward()
    assert qs.box_head.layers[-1].weight.grad.abs().sum() > 0


def test_conv_feed_forward_is_the_same_function_and_export_puts_the_ffn_back(tiny):
    from dinodet.deploy.export import _conv_ffn
    from dinodet.models.encoder import ConvFeedForward, FeedForward

    ffn = FeedForward(16, 40, dropout=0.1).eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ConvFeedForward(ffn)(x), ffn(x), atol=1e-5, rtol=1e-5)
    model = tiny[1]
    before = [m for m in model.modules() if isinstance(m, FeedForward)]
    with _conv_ffn(model, True):
        assert not any(isinstance(m, FeedForward) for m in model.modules())
        assert sum(isinstance(m, ConvFeedForward) for m in model.modules()) == len(before)
    assert [m for m in model.modules() if isinstance(m, FeedForward)] == before
