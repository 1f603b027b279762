"""Training/eval transforms: boxes stay on their objects, official sizes, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

from dinodet.config import DataConfig
from dinodet.data.augment import (
    DetectionTransform,
    DropEmptyBoxes,
    RandomResize,
    RandomSizeCrop,
    eval_transforms,
    train_transforms,
)
from dinodet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size, eval_transform

CFG = DataConfig(train_scales=(64, 80, 96), max_size=160, crop_resize_scales=(80, 100, 120), crop_size=(48, 90),
                 eval_size=96, num_workers=0)
RED, GREEN = (255, 0, 0), (0, 255, 0)


def _scene() -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """160x120 black image, a red box (label 0) left and a green box (label 1) at the bottom right."""
    a = np.zeros((120, 160, 3), np.uint8)
    a[10:50, 10:40] = RED
    a[70:110, 110:150] = GREEN
    target = {"boxes": torch.tensor([[10.0, 10, 40, 50], [110, 70, 150, 110]]), "labels": torch.tensor([0, 1]),
              "image_id": torch.tensor(7)}
    return Image.fromarray(a), target


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return image * std + mean


def _pixel_boxes(target: dict[str, torch.Tensor]) -> torch.Tensor:
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def test_flip_moves_box_with_pixels():
    image, target = _scene()
    flip = DetectionTransform(v2.Compose([v2.RandomHorizontalFlip(1.0)]))
    out, t = flip(image, target)
    torch.testing.assert_close(_pixel_boxes(t), torch.tensor([[120.0, 10, 150, 50], [10, 70, 50, 110]]))
    rgb = _unnormalise(out)
    assert rgb[0, 30, 135] > 0.95 and rgb[0, 30, 25] < 0.05  # red moved to the right
    assert t["labels"].tolist() == [0, 1] and int(t["image_id"]) == 7


def test_train_transforms_keep_boxes_on_their_objects():
    image, target = _scene()
    tf = train_transforms(CFG)
    torch.manual_seed(0)
    flipped = dropped = 0
    for _ in range(40):
        out, t = tf(image, target)
        h, w = out.shape[1:]
        assert t["size"].tolist() == [h, w] and max(h, w) <= 160 + 2
        assert min(h, w) in CFG.train_scales or max(h, w) >= 158
        rgb = _unnormalise(out)
        boxes = _pixel_boxes(t)
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= -1e-3).all() and (boxes[:, [0, 2]] <= w + 1e-3).all() and (boxes[:, [1, 3]] <= h + 1e-3).all()
        dropped += 2 - len(boxes)
        for box, label in zip(boxes.tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = box
            # the inside of the box (away from blurred edges) has the object's colour
            ix1, iy1, ix2, iy2 = int(x1) + 2, int(y1) + 2, int(np.ceil(x2)) - 2, int(np.ceil(y2)) - 2
            if ix2 > ix1 and iy2 > iy1:
                inner = rgb[:, iy1:iy2, ix1:ix2].mean(dim=(1, 2))
                assert inner[label] > 0.8 and inner[1 - label] < 0.2, (box, label, inner)
            if label == 0 and (x1 + x2) / 2 > w / 2:
                flipped += 1
        # and no coloured pixel lies outside every box (boxes were dropped only with their object)
        coloured = rgb[:2].amax(0) > 0.5
        covered = torch.zeros_like(coloured)
        for x1, y1, x2, y2 in boxes.tolist():
            covered[max(int(y1) - 1, 0):int(np.ceil(y2)) + 1, max(int(x1) - 1, 0):int(np.ceil(x2)) + 1] = True
        assert not (coloured & ~covered).any()
    assert flipped > 0 and dropped > 0  # both the flip and the crop's box removal were exercised


def test_eval_transforms_match_inference_preprocessing():
    image, target = _scene()
    out, t = eval_transforms(CFG)(image, target)
    torch.testing.assert_close(out, eval_transform(image, CFG.eval_size, CFG.max_size), rtol=0, atol=0)
    assert t["size"].tolist() == list(eval_size(120, 160, CFG.eval_size, CFG.max_size))
    torch.testing.assert_close(t["boxes"], torch.tensor([[25 / 160, 30 / 120, 30 / 160, 40 / 120],
                                                         [130 / 160, 90 / 120, 40 / 160, 40 / 120]]))


@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (265, 1160)])
def test_random_resize_uses_official_size_rule(hw: tuple[int, int]):
    scales, max_size = (480, 512, 800), 1333
    image = Image.new("RGB", (hw[1], hw[0]))
    allowed = {eval_size(*hw, s, max_size) for s in scales}
    rr = RandomResize(scales, max_size)
    torch.manual_seed(0)
    got = {(im.height, im.width) for im in (rr(image) for _ in range(12))}
    assert got <= allowed and len(got) == min(len(allowed), 3)


def test_crop_of_small_image_and_empty_box_removal():
    image = Image.new("RGB", (30, 20))
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    from torchvision import tv_tensors

    torch.manual_seed(0)
    for _ in range(5):
        im, _ = RandomSizeCrop(48, 64)(image, tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(20, 30)))
        assert im.width <= 30 and im.height <= 20
    target = {"boxes": torch.tensor([[0.0, 0, 5, 5], [3, 3, 3, 8], [1, 1, 4, 1]]), "labels": torch.tensor([4, 5, 6])}
    _, t = DropEmptyBoxes()(image, target)
    assert t["labels"].tolist() == [4] and t["boxes"].tolist() == [[0, 0, 5, 5]]


def test_train_transforms_are_deterministic_under_seed():
    image, target = _scene()
    tf = train_transforms(CFG)

    def run(seed: int):
        torch.manual_seed(seed)
        return [tf(image, target) for _ in range(6)]

    a, b, c = run(3), run(3), run(4)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    assert any(ia.shape != ic.shape or not torch.equal(ia, ic) for (ia, _), (ic, _) in zip(a, c))


def test_train_flip_happens_about_half_the_time():
    image, target = _scene()
    tf = train_transforms(CFG)
    torch.manual_seed(0)
    flips = []
    for _ in range(60):
        _, t = tf(image, target)
        if t["labels"].tolist() == [0, 1]:  # both objects survived: the red one is left of the green one unless flipped
            boxes = _pixel_boxes(t)
            flips.append(bool(boxes[0, 0] > boxes[1, 0]))
    assert len(flips) > 20 and 0.25 < sum(flips) / len(flips) < 0.75


def test_random_size_crop_stays_inside_the_image():
    image = Image.new("RGB", (400, 50), (255, 255, 255))  # wide: a crop outside it would add black padding
    crop = RandomSizeCrop(10, 40)
    torch.manual_seed(0)
    for _ in range(20):
        out = crop(image)
        assert np.asarray(out).min() == 255, out.size


def test_crop_branch_first_resize_has_no_max_size():
    # official: RandomResize([400, 500, 600]) without max_size before the crop, so a very elongated image
    # is first made tall enough for a crop of up to crop_size in both directions (near-square crops);
    # capping it at max_size would leave crops as thin as the capped image.
    image = Image.new("RGB", (400, 40), (255, 255, 255))  # aspect ratio 10
    target = {"boxes": torch.tensor([[0.0, 0, 400, 40]]), "labels": torch.tensor([1])}
    tf = train_transforms(CFG)
    torch.manual_seed(0)
    aspects = [out.shape[2] / out.shape[1] for out, _ in (tf(image, target) for _ in range(20))]
    cropped = [a for a in aspects if a < 8]  # the uncropped branch keeps the aspect ratio of ~10
    assert cropped and len(cropped) < len(aspects)
    assert max(cropped) < 90 / 48 + 0.1, aspects
