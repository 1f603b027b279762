import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.visualize import PALETTE, class_color, draw_detections, text_color


def _gray(w: int = 200, h: int = 120) -> Image.Image:
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_draws_boxes_and_captions_without_touching_the_input():
    image = _gray()
    before = np.asarray(image).copy()
    out = draw_detections(image, torch.tensor([[40.0, 50.0, 150.0, 110.0]]), ["dog"], torch.tensor([0.87]))

    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(image), before)  # input untouched
    a = np.asarray(out)
    color = list(class_color("dog"))
    assert a[80, 40].tolist() == color  # left edge of the box
    assert a[110, 100].tolist() == color  # bottom edge
    assert a[80, 100].tolist() == [128, 128, 128]  # inside the box: untouched
    # the caption sits on a filled box of the class colour just above the box, with contrasting text
    caption = a[40:49, 41:88].reshape(-1, 3)
    assert (caption == color).all(axis=1).mean() > 0.5
    assert (caption == text_color(class_color("dog"))).all(axis=1).any()
    assert a[40:49, 100:140].tolist() == before[40:49, 100:140].tolist()  # caption is not wider than needed
    changed = (a != before).any(axis=2).mean()
    assert 0.02 < changed < 0.5


def test_caption_inside_when_box_touches_the_top_and_sequences_accepted():
    out = draw_detections(_gray(), [[0, 0, 60, 60]], ["person"], [0.5])
    a = np.asarray(out)
    caption = a[0:14, 0:60].reshape(-1, 3)  # inside the image, over the box's top edge
    assert not (caption == 128).all(axis=1).any()  # fully covered: no background shows through
    assert (caption == class_color("person")).all(axis=1).mean() > 0.3


def test_no_scores_and_no_detections():
    image = _gray()
    assert np.array_equal(np.asarray(draw_detections(image, torch.zeros(0, 4), [], torch.zeros(0))), np.asarray(image))
    out = draw_detections(image, [[10, 10, 50, 50]], ["cat"])  # caption with the name only
    assert (np.asarray(out) != np.asarray(image)).any()


def test_other_modes_and_large_images_scale_line_width():
    out = draw_detections(Image.new("L", (2000, 1500), 200), [[100, 100, 900, 900]], ["car"], [0.9])
    assert out.mode == "RGB" and out.size == (2000, 1500)
    row = np.asarray(out)[500, 95:115]
    assert (row == class_color("car")).all(axis=1).sum() >= 5  # thicker than a hairline


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        draw_detections(_gray(), [[0, 0, 1, 1], [0, 0, 2, 2]], ["a"], [0.1, 0.2])


def test_colors_are_stable_and_text_contrasts():
    assert class_color("person") == class_color("person") and class_color("person") in PALETTE
    assert text_color((255, 255, 0)) == (0, 0, 0)
    assert text_color((20, 20, 120)) == (255, 255, 255)


def test_ground_truth_is_a_white_outline_with_a_dark_edge():
    from dinodet.visualize import draw_ground_truth

    image = _gray()
    out = np.asarray(draw_ground_truth(image, [[40.0, 50.0, 150.0, 110.0]]))
    assert out[80, 40].tolist() == [255, 255, 255]  # the box's left edge
    assert out[80, 39].tolist() == [0, 0, 0]  # the dark edge outside it
    assert out[80, 100].tolist() == [128, 128, 128]  # inside: untouched
    assert np.asarray(image)[80, 40].tolist() == [128, 128, 128]  # input untouched
    assert np.array_equal(np.asarray(draw_ground_truth(image, torch.zeros(0, 4))), np.asarray(image))
