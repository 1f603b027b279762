import random

import pytest
import torch
from PIL import Image

from dinodet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size, eval_transform, pad_batch


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),  # 800 * 640 / 480 = 1066.67, truncated
        ((640, 480), (1066, 800)),
        ((427, 640), (800, 1199)),  # 1199.06
        ((800, 1000), (800, 1000)),  # short side already 800: unchanged
        ((800, 800), (800, 800)),
        ((10, 10), (800, 800)),  # upscaling
        # long side capped: short = round(1333 * 500 / 2000) = round(333.25) = 333, long = int(333 * 4)
        ((500, 2000), (333, 1332)),
        ((2000, 500), (1332, 333)),
        ((100, 1000), (133, 1330)),  # round(133.3) = 133
        # 1000/600*800 = 1333.3 > 1333 -> short = round(799.8) = 800 -> long = int(1333.3) = 1333
        ((600, 1000), (800, 1333)),
        # rounding the short side UP lets the long side pass the cap, exactly as officially:
        # short = round(1333 * 265 / 1160) = round(304.52) = 305, long = int(305 * 1160 / 265) = 1335
        ((265, 1160), (305, 1335)),
    ],
)
def test_eval_size_official_rule(hw, expected):
    assert eval_size(*hw) == expected


def test_eval_size_configurable():
    assert eval_size(480, 640, size=320, max_size=512) == (320, 426)
    assert eval_size(480, 1280, size=320, max_size=512) == (192, 512)  # round(512*480/1280) = 192
    assert eval_size(100, 1000, size=800, max_size=None) == (800, 8000)
    assert eval_size(1, 600, size=64, max_size=128) == (1, 600)  # short side rounds to 0: kept at 1 px


def test_eval_size_bounds_on_random_shapes():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        oh, ow = eval_size(h, w)
        # the official rule rounds the short side, so the long side may pass max_size by up to
        # half the aspect ratio (never by more)
        assert min(oh, ow) <= 800 and max(oh, ow) <= 1333 + 0.5 * max(h, w) / min(h, w)
        # aspect ratio kept up to the integer rounding of either side
        assert abs(oh / ow - h / w) <= h / w * (1 / min(oh, ow) + 1 / max(oh, ow)) + 1e-9


def _constant_image(rgb: tuple[int, int, int], w: int = 64, h: int = 48) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def test_eval_transform_shape_and_normalisation():
    rgb = (124, 116, 104)  # ~ ImageNet mean * 255
    x = eval_transform(_constant_image(rgb), size=32, max_size=100)
    assert x.dtype == torch.float32 and x.shape == (3, 32, 42)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x[:, 5, 5], expected)


def test_eval_transform_accepts_pil_uint8_and_float_tensors(sample_images):
    im = Image.open(sample_images[0]).convert("RGB")
    u8 = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3).permute(2, 0, 1)
    from_pil = eval_transform(im, 320, 512)
    assert from_pil.shape == (3, 320, 426)
    # uint8 tensors go through the very same PIL resize: identical values
    assert torch.equal(eval_transform(u8, 320, 512), from_pil)
    # float tensors are resized as tensors (antialiased bilinear): close, not identical
    from_float = eval_transform(u8.float() / 255, 320, 512)
    assert from_float.shape == from_pil.shape
    assert (from_float - from_pil).abs().mean() < 0.02


@pytest.mark.parametrize(
    "bad", [torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, 3), torch.zeros(3, 8, 8, dtype=torch.int32)]
)
def test_eval_transform_rejects_bad_tensors(bad):
    with pytest.raises(ValueError, match="image tensor"):
        eval_transform(bad)


def test_pad_batch_mask():
    batch, mask = pad_batch([torch.ones(3, 2, 5), torch.ones(3, 4, 3)])
    assert batch.shape == (2, 3, 4, 5) and mask.shape == (2, 4, 5)
    assert mask[0, :2, :].logical_not().all() and mask[0, 2:, :].all()
    assert mask[1, :, :3].logical_not().all() and mask[1, :, 3:].all()
