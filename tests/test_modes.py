"""Inference modes: each one runs, leaves the caller's model alone, and agrees with the exact path."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from dinodet.inference.modes import (
    COMPILE_BUCKET,
    MODES,
    ModeRunner,
    get_mode,
    pad_to_bucket,
    repeat_to_batch,
    supported_modes,
)
from dinodet.models.attention import MultiScaleDeformableAttention
from dinodet.models.dino import DINO
from dinodet.presets import get_preset


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = DINO(get_preset("tiny").model).eval()
    images = torch.randn(2, 3, 96, 120)
    mask = torch.zeros(2, 96, 120, dtype=torch.bool)
    mask[1, :, 100:] = True  # second image is narrower: padded on the right
    return model, images, mask


def test_modes_on_cpu():
    assert supported_modes("cpu") == ["reference", "exact", "channels_last", "bf16", "compile"]
    assert {"fp16", "compile_bf16"} <= set(supported_modes("cuda"))
    with pytest.raises(ValueError, match="unknown inference mode 'turbo'"):
        get_mode("turbo")
    with pytest.raises(ValueError, match="not available on cpu"):
        ModeRunner(torch.nn.Identity(), "fp16", "cpu")
    assert ModeRunner(torch.nn.Identity(), "fp16", "cpu", emulate=True).mode.amp == "fp16"  # benchmarks only


def test_exact_mode_matches_reference_on_cpu(model_and_batch, one_thread):
    model, images, mask = model_and_batch
    ref = ModeRunner(model, "reference", "cpu")(images, mask)
    exact = ModeRunner(model, "exact", "cpu")(images, mask)  # embedding_bag MSDA: float32 rounding only
    torch.testing.assert_close(exact.pred_logits, ref.pred_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(exact.pred_boxes, ref.pred_boxes, rtol=0, atol=1e-5)


def test_runner_does_not_change_the_callers_model(model_and_batch):
    model, _, _ = model_and_batch
    backends = {m.backend for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)}
    runner = ModeRunner(model, "bf16", "cpu")
    assert runner.model is not model
    assert {m.backend for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)} == backends
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous() and not runner.model.backbone.body.conv1.weight.is_contiguous()


@pytest.mark.parametrize("mode", ["bf16", "fp16"])  # fp16 is CUDA-only: emulated here, for its numerics
def test_half_modes_detections_close_to_exact(model_and_batch, one_thread, mode):
    model, images, mask = model_and_batch
    exact = ModeRunner(model, "exact", "cpu")(images, mask)
    fast = ModeRunner(model, mode, "cpu", emulate=True)(images, mask)
    assert fast.pred_boxes.shape == exact.pred_boxes.shape
    # half types may reorder near-tied encoder proposals (random weights tie a lot), so compare the box sets:
    # nearly every exact box has a fast box within 0.02 (L1, normalised coordinates)
    nearest = torch.cdist(exact.pred_boxes, fast.pred_boxes.float(), p=1).min(-1).values
    assert nearest.quantile(0.9, dim=1).max() < 0.02
    top_exact = exact.pred_logits.sigmoid().flatten(1).topk(10).values
    top_fast = fast.pred_logits.float().sigmoid().flatten(1).topk(10).values
    torch.testing.assert_close(top_fast, top_exact, rtol=0, atol=0.05)


def test_pad_to_bucket_marks_padding():
    images, mask = torch.ones(1, 3, 100, 130), torch.zeros(1, 100, 130, dtype=torch.bool)
    padded, pmask = pad_to_bucket(images, mask)
    assert padded.shape[-2:] == (-(-100 // COMPILE_BUCKET) * COMPILE_BUCKET, -(-130 // COMPILE_BUCKET) * COMPILE_BUCKET)
    assert pad_to_bucket(torch.ones(1, 3, 800, 1199), torch.zeros(1, 800, 1199, dtype=torch.bool))[0].shape[-2:] == (
        832, 1216)  # the benchmark size: +5.5% pixels
    assert pmask[0, :100, :130].logical_not().all() and pmask[0, 100:].all() and pmask[0, :, 130:].all()
    assert padded[0, :, 100:].abs().sum() == 0
    same, smask = pad_to_bucket(padded, pmask)
    assert same is padded and smask is pmask


def test_repeat_to_batch_repeats_the_last_image_and_first_images_drops_it(model_and_batch, one_thread):
    model, images, mask = model_and_batch
    padded, pmask = repeat_to_batch(4, images, mask)
    assert padded.shape[0] == pmask.shape[0] == 4
    assert torch.equal(padded[:2], images) and torch.equal(padded[3], images[1]) and torch.equal(pmask[2], mask[1])
    assert repeat_to_batch(2, images, mask)[0] is images and repeat_to_batch(1, images, mask)[0] is images
    exact = ModeRunner(model, "exact", "cpu")
    out = exact(images, mask)
    first = exact(padded, pmask).first_images(2)
    for name in ("logits", "boxes", "interm_logits", "interm_boxes", "enc_topk_index"):
        assert getattr(first, name).shape == getattr(out, name).shape
    torch.testing.assert_close(first.pred_boxes, out.pred_boxes, rtol=0, atol=1e-5)  # images are independent
    torch.testing.assert_close(first.pred_logits, out.pred_logits, rtol=0, atol=1e-4)


def test_every_mode_has_a_description():
    assert all(m.description for m in MODES.values())


def _compiled_batches_agree(model, batches, monkeypatch, backend="inductor"):
    """Run each (batch, expected graph count) through a fresh compiled runner: detections equal exact
    mode's on the same padded input up to float32 rounding, and the graph count is as expected."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier tests (exports) may have traced graphs too
    # the runner calls torch.compile itself; another backend changes code generation only, not
    # dynamo's tracing, guards and recompilation decisions
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    runner = ModeRunner(model, "compile", "cpu")
    monkeypatch.undo()
    exact = ModeRunner(model, "exact", "cpu")
    for batch, graphs in batches:
        fast = runner(*batch)
        ref = exact(*pad_to_bucket(*batch))
        # near-tied encoder proposals may swap places: compare box sets and top scores, not slots
        nearest = torch.cdist(ref.pred_boxes, fast.pred_boxes, p=1).min(-1).values
        assert nearest.quantile(0.9, dim=1).max() < 1e-3
        top_ref = ref.pred_logits.sigmoid().flatten(1).topk(10).values
        torch.testing.assert_close(fast.pred_logits.sigmoid().flatten(1).topk(10).values, top_ref, rtol=0, atol=1e-3)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compile_mode_one_graph_per_bucket_and_exact_numbers(model_and_batch, one_thread, monkeypatch):
    """The compiled mode (the fastest on CPU) pads to 64-pixel buckets: a second, differently sized
    batch in the same bucket reuses the compiled graph.  (Compiling takes a minute or two on 2 cores.)"""
    model, images, mask = model_and_batch
    _compiled_batches_agree(model, [((images, mask), 1),
                                    ((images[:, :, :80, :110], mask[:, :80, :110]), 1)],  # both pad to 128x128
                            monkeypatch)


_INDUCTOR_LONG = pytest.mark.skipif(not os.environ.get("DINODET_LONG_TESTS"),
                                    reason="compiles three graphs with Inductor (30 minutes on 2 cores); "
                                    "set DINODET_LONG_TESTS=1")


@pytest.mark.parametrize("backend", ["eager",
                                     pytest.param("inductor", marks=[_INDUCTOR_LONG, pytest.mark.timeout(3600)])])
def test_compile_mode_new_sizes_share_one_dynamic_graph(model_and_batch, one_thread, monkeypatch, backend):
    """The graph count across sizes is dynamo's decision (guards, automatic dynamic shapes), whatever
    generates the code, so the default run traces with the eager backend (about a minute): a batch in a
    new bucket (new height and width) makes the one dynamic graph and later buckets reuse it, with
    exact numbers.  With Inductor (opt-in) the dynamic graph's kernels are checked too."""
    model, images, mask = model_and_batch
    torch.manual_seed(1)
    _compiled_batches_agree(model, [
        ((images, mask), 1),
        ((torch.randn(2, 3, 150, 200), torch.zeros(2, 150, 200, dtype=torch.bool)), 2),  # 192x256: dynamic graph
        ((torch.randn(2, 3, 250, 140), torch.zeros(2, 250, 140, dtype=torch.bool)), 2),  # 256x192: reused
        # a smaller batch is padded to the largest seen (batch 1 would be a graph of its own, twice over)
        ((torch.randn(1, 3, 300, 70), torch.zeros(1, 300, 70, dtype=torch.bool)), 2),
        ((torch.randn(3, 3, 200, 200), torch.zeros(3, 200, 200, dtype=torch.bool)), 3),  # larger: dynamic batch
        ((torch.randn(2, 3, 130, 300), torch.zeros(2, 130, 300, dtype=torch.bool)), 3),  # padded to 3: reused
    ], monkeypatch, backend=backend)


def _backends(model):
    return {m.backend for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)}


def test_modes_run_the_configs_msda_backend_and_reference_forces_pytorch(monkeypatch, one_thread):
    """The config's ``model.msda_backend`` is what the modes run (it used to be replaced by the mode's
    ``auto``); only ``reference`` overrides it, also over $DINODET_MSDA, for parity."""
    from dinodet.config import apply_overrides
    from dinodet.models.ops import msda

    monkeypatch.delenv("DINODET_MSDA", raising=False)
    calls = []

    def spy(*args):
        calls.append(args[0].dtype)
        return msda.ms_deform_attn_gather(*args)

    monkeypatch.setitem(msda._LOADED, "gather", spy)
    torch.manual_seed(0)
    model = DINO(apply_overrides(get_preset("tiny"), ['model.msda_backend="gather"']).model)
    images, mask = torch.randn(1, 3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.bool)
    for mode in ("exact", "channels_last", "bf16"):
        runner = ModeRunner(model, mode, "cpu")
        assert runner.msda_backend == "gather" and _backends(runner.model) == {"gather"}
    exact = ModeRunner(model, "exact", "cpu")
    exact(images, mask)
    assert calls and set(calls) == {torch.float32}
    monkeypatch.setenv("DINODET_MSDA", "embedding_bag")
    reference = ModeRunner(model, "reference", "cpu")
    assert reference.msda_backend == "pytorch" and _backends(reference.model) == {"pytorch"}
    assert ModeRunner(model, "exact", "cpu").msda_backend == "embedding_bag"  # the variable replaces the config
    assert _backends(exact.model) == {"gather"}  # configured once: a later variable does not change a runner


def test_detector_honours_the_checkpoint_config(monkeypatch):
    from dinodet.config import apply_overrides
    from dinodet.inference.detector import Detector
    from dinodet.models import build_model

    monkeypatch.delenv("DINODET_MSDA", raising=False)
    cfg = apply_overrides(get_preset("tiny"), ['model.msda_backend="gather"'])
    assert _backends(Detector(build_model(cfg), cfg).model) == {"gather"}
    assert _backends(Detector(build_model(cfg), cfg, mode="reference").model) == {"pytorch"}
    assert _backends(Detector(build_model(get_preset("tiny")), get_preset("tiny")).model) == {"embedding_bag"}
