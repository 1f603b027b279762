"""Fine-tuning from another checkpoint: what is loaded, and which class rows are carried over."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from dinodet.checkpoint import CheckpointError, save_checkpoint
from dinodet.compat.official_keys import to_official
from dinodet.config import apply_overrides
from dinodet.data.coco_classes import COCO_CLASSES
from dinodet.engine.finetune import CLASS_HEAD_PREFIXES, LABEL_BOOK_PREFIX, class_rows, load_finetune_weights
from dinodet.engine.train import resolve_config
from dinodet.models import build_model
from dinodet.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")
CLASS_ROW_PARAMS = CLASS_HEAD_PREFIXES + (LABEL_BOOK_PREFIX,)


def _source(tmp_path: Path, names: list[str], ids: list[int]) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = resolve_config(get_preset("tiny"), len(names))
    torch.manual_seed(1)
    src = build_model(cfg)
    return save_checkpoint(tmp_path / "src.pt", src, cfg, names, ids), src.state_dict()


def test_class_rows_by_id_then_by_name():
    # same id and name; same name under another id (YOLO ids 0..); unknown; placeholder slots never match
    assert class_rows(["N/A", "person", "bicycle"], [0, 1, 2], ["Bicycle", "person", "dog", "N/A"],
                      [0, 1, 2, 3]) == [2, 1, None, None]
    # an id whose name differs is not the same class
    assert class_rows(["cat", "dog"], [1, 2], ["dog"], [1]) == [1]


def test_other_classes_start_fresh_and_everything_else_is_loaded(tmp_path: Path):
    ckpt, src_state = _source(tmp_path, ["a", "b", "c", "d"], [1, 2, 3, 4])
    torch.manual_seed(2)  # other initial weights, other class set and count
    dst = build_model(resolve_config(get_preset("tiny"), 3))
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    result = load_finetune_weights(dst, ckpt, ["x", "y", "z"], [1, 2, 3])
    assert (result.carried, result.new) == ([], ["x", "y", "z"])
    assert sorted({k.rsplit(".", 1)[0] for k in result.reinitialised}) == [
        "class_head", "denoising.label_embed", "query_selection.class_head"]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, init[k] if k in result.reinitialised else src_state[k]), k
    assert "none of the dataset's classes" in result.summary()

    same = build_model(resolve_config(get_preset("tiny"), 4))
    result = load_finetune_weights(same, ckpt, ["a", "b", "c", "d"], [1, 2, 3, 4])
    assert result.new == [] and result.reinitialised == [] and result.summary() == ""
    for k, v in same.state_dict().items():
        assert torch.equal(v, src_state[k]), k


def test_known_classes_keep_their_rows(tmp_path: Path):
    """A subset of the checkpoint's classes, reordered and with new ids, plus one new class."""
    ckpt, src_state = _source(tmp_path, ["a", "b", "c", "d"], [1, 2, 3, 4])
    torch.manual_seed(2)
    dst = build_model(resolve_config(get_preset("tiny"), 3))
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    result = load_finetune_weights(dst, ckpt, ["c", "new", "a"], [0, 1, 2])
    assert (result.carried, result.new, result.reinitialised) == (["c", "a"], ["new"], [])
    assert "2 of 3 classes carried over" in result.summary()
    got = dst.state_dict()
    for k, v in got.items():
        if not k.startswith(CLASS_ROW_PARAMS):
            assert torch.equal(v, src_state[k]), k
            continue
        assert torch.equal(v[0], src_state[k][2]) and torch.equal(v[2], src_state[k][0]), k  # c, a
        assert torch.equal(v[1], init[k][1]), k  # the new class starts fresh
    assert torch.equal(got[LABEL_BOOK_PREFIX + "weight"][3], init[LABEL_BOOK_PREFIX + "weight"][3])  # extra row

    # the same classes in another order: all carried over, and said so
    swapped = build_model(resolve_config(get_preset("tiny"), 4))
    result = load_finetune_weights(swapped, ckpt, ["b", "a", "d", "c"], [2, 1, 4, 3])
    assert result.new == [] and "all 4 classes carried over" in result.summary()
    assert torch.equal(swapped.state_dict()["class_head.bias"], src_state["class_head.bias"][[1, 0, 3, 2]])


def test_a_runs_ema_weights_are_the_start(tmp_path: Path):
    cfg = resolve_config(get_preset("tiny"), 2)
    torch.manual_seed(3)
    ema_state = build_model(cfg).state_dict()
    run_ckpt = save_checkpoint(tmp_path / "run.pt", build_model(cfg), cfg, ["a", "b"], [1, 2],
                               extra={"ema": {"module": ema_state}})
    dst = build_model(cfg)
    load_finetune_weights(dst, run_ckpt, ["a", "b"], [1, 2])
    for k, v in dst.state_dict().items():
        assert torch.equal(v, ema_state[k]), k


def test_official_coco_checkpoint_onto_a_coco_subset(tmp_path: Path):
    """Official files load into the run's own architecture; the COCO classes of the dataset keep
    their rows of the 91 slots (found by id and name, or by name for YOLO-style ids)."""
    cfg = get_preset("tiny")  # 91 classes, like the official COCO models
    torch.manual_seed(3)
    official = build_model(cfg)
    state = to_official(official.state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    torch.save({"model": state, "args": argparse.Namespace(num_classes=91)}, tmp_path / "official.pth")
    src = official.state_dict()

    dst = build_model(resolve_config(get_preset("tiny"), 3))
    result = load_finetune_weights(dst, tmp_path / "official.pth", ["dog", "person", "unicorn"], [0, 1, 2])
    assert (result.carried, result.new) == (["dog", "person"], ["unicorn"])
    dog, person = COCO_CLASSES.index("dog"), COCO_CLASSES.index("person")
    for k, v in dst.state_dict().items():
        if k.startswith(CLASS_ROW_PARAMS):
            assert torch.equal(v[0], src[k][dog]) and torch.equal(v[1], src[k][person]), k
        else:
            assert torch.equal(v, src[k]), k

    other = build_model(resolve_config(apply_overrides(get_preset("tiny"), ["model.hidden_dim=32"]), 2))
    with pytest.raises(CheckpointError, match="official.pth"):
        load_finetune_weights(other, tmp_path / "official.pth", ["a", "b"], [1, 2])
