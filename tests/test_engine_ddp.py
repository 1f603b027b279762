"""Distributed training: 2 gloo processes x batch 1 end in the same weights as 1 process x batch 2.

Why they can be equal: the data order comes from a DistributedSampler in both cases (the global
batch k is samples 2k, 2k+1 of the same permutation), the criterion normalises by the box count
averaged over processes and DDP averages the gradients, so the summed gradient is that of the
whole batch.  Denoising is off (its group count depends on the largest image per process) and the
training images are not augmented (augmentation draws differ per process).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinodet.checkpoint import read_torch_file
from dinodet.config import DINOConfig, apply_overrides
from dinodet.data.coco import build_dataset
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.run_dir import CHECKPOINT, FINAL_METRICS
from dinodet.engine.train import TrainOptions, train
from dinodet.models import build_model
from dinodet.presets import get_preset

SIZE = 64
# The distributed mechanics are under test, so the backbone is the official frozen-BN one: tiny's
# GroupNorm over 2x2 maps at 64 px (8 values per group) amplifies the rounding differences between
# batch-1 and batch-2 convolution kernels to a few % of a 4-step update (4.2% measured), which would
# hide a real DDP error of that size.
OVERRIDES = [f"data.eval_size={SIZE}", f"data.max_size={SIZE}", "data.num_workers=0", "model.num_queries=20",
             "model.num_select=20", "model.dn_number=0", "train.epochs=2", "train.lr=1e-3", "train.lr_backbone=1e-4",
             "model.backbone.norm=frozen_bn", "model.backbone.freeze_at=0"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _run(root: str, run_dir: str, batch_size: int, *extra: str) -> dict:
    torch.set_num_threads(1)
    cfg = apply_overrides(get_preset("tiny"), [*OVERRIDES, f"train.batch_size={batch_size}", *extra])
    tr = build_dataset(root, "train", train=False, data_cfg=cfg.data)
    va = build_dataset(root, "val", train=False, data_cfg=cfg.data, label_map=tr.label_map)
    return train(cfg, tr, va, TrainOptions(run_dir=Path(run_dir), progress=False, tensorboard=False))


def _worker(rank: int, world: int, port: int, root: str, run_dir: str) -> None:
    # what torchrun exports for every process
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _run(root, run_dir, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_dist_env(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)


def _relative_distance(a: dict, b: dict, init: dict) -> float:
    """||a - b|| / ||b - init|| over all weights: the difference relative to what training changed."""
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b if b[k].is_floating_point())
    den = sum(((b[k].double() - init[k].double()) ** 2).sum() for k in b if b[k].is_floating_point())
    return float((num / den).sqrt())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_total_batch(tmp_path: Path, no_dist_env):
    root = str(make_synthetic_coco(tmp_path / "data", num_train=4, num_val=2, image_size=(SIZE, SIZE), seed=0))
    single = _run(root, str(tmp_path / "batch2"), 2)
    _run(root, str(tmp_path / "accum2"), 1, "train.accumulate=2")
    mp.spawn(_worker, args=(2, _free_port(), root, str(tmp_path / "ddp")), nprocs=2, join=True)

    ddp = read_torch_file(tmp_path / "ddp" / CHECKPOINT)
    batch2 = read_torch_file(tmp_path / "batch2" / CHECKPOINT)
    accum2 = read_torch_file(tmp_path / "accum2" / CHECKPOINT)
    assert ddp["step"] == batch2["step"] == accum2["step"] == 4
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2  # every rank's RNG state is kept
    cfg = DINOConfig.from_json(batch2["config"])
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation
    init = build_model(cfg).state_dict()

    # vs 1 process x batch 2: equal up to float32 noise (batched vs single-image kernels), which
    # Adam's normalisation amplifies in near-zero gradients: measured 0.5% of the update
    assert _relative_distance(ddp["model"], batch2["model"], init) < 0.03
    # vs 1 process x (batch 1, accumulate 2): the same per-image computation, so much closer
    # (measured 2e-4 of the update, max |diff| 2e-5)
    assert _relative_distance(ddp["model"], accum2["model"], init) < 3e-3
    for k, v in accum2["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=0, atol=2e-4, msg=k)

    metrics = json.loads((tmp_path / "ddp" / FINAL_METRICS).read_text())
    assert set(single) <= set(metrics)
    assert metrics["num_images"] == 2  # evaluation shards the val images and gathers them on rank 0
    assert not list((tmp_path / "ddp").glob(".*.tmp*"))
