"""Early stopping (``TrainOptions.patience`` / ``train --patience``): a run whose val AP stops
improving ends early with its best checkpoint kept and says why; ``--resume`` of it says it is
finished instead of training on, unless a larger patience is given."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_engine_train import SIZE, datasets, run, small_config

from dinodet.checkpoint import read_torch_file
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.logging import METRICS_LOG, read_metrics_log
from dinodet.engine.run_dir import BEST_CHECKPOINT, CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=1, image_size=(SIZE, SIZE),
                               seed=0)


def test_patience_stops_a_run_without_progress_and_resume_says_finished(shapes: Path, tmp_path: Path, caplog):
    # lr 0: the weights never change, so the AP of the first evaluation is never beaten
    cfg = small_config("train.epochs=4", "train.lr=0", "train.lr_backbone=0")
    tr, va = datasets(shapes, cfg, augment=False)
    with caplog.at_level(logging.INFO, logger="dinodet"):
        metrics = run(cfg, tr, va, tmp_path, patience=1)
    assert metrics["epoch"] == 2  # epoch 1 sets the best AP, epoch 2 does not beat it
    assert "stopping early after epoch 2" in caplog.text and "patience 1" in caplog.text
    assert len([r for r in read_metrics_log(tmp_path / METRICS_LOG) if "eval_AP" in r]) == 2
    assert read_torch_file(tmp_path / BEST_CHECKPOINT)["epoch"] == 1
    saved = read_torch_file(tmp_path / CHECKPOINT)
    assert saved["stopped_early"] and saved["evals_since_best"] == 1 and saved["patience"] == 1

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinodet"):
        again = run(cfg, tr, va, tmp_path, resume=True)
    assert "the run is finished: it stopped early at epoch 2" in caplog.text
    assert again["step"] == metrics["step"] and again["epoch"] == 2

    longer = run(cfg, tr, va, tmp_path, resume=True, patience=2)  # one more evaluation allowed
    assert longer["epoch"] == 3 and longer["step"] > metrics["step"]


def test_patience_running_out_at_the_last_epoch_is_no_early_stop(shapes: Path, tmp_path: Path):
    cfg = small_config("train.epochs=2", "train.lr=0", "train.lr_backbone=0")
    tr, va = datasets(shapes, cfg, augment=False)
    # the patience runs out at the last epoch: no early stop, so more --epochs on resume train on
    assert run(cfg, tr, va, tmp_path / "last", patience=1)["epoch"] == 2
    assert not read_torch_file(tmp_path / "last" / CHECKPOINT)["stopped_early"]
