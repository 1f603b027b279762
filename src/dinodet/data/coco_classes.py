"""COCO 2017 detection category names indexed by COCO category id.

The official DINO checkpoints have 91 class slots where slot ``k`` is COCO category id ``k``
(ids 1..90, with gaps); unused slots (0 and the 10 ids COCO 2017 dropped) are ``"N/A"``.
"""
from __future__ import annotations

# index = COCO category id; 91 entries (0..90).
COCO_CLASSES: tuple[str, ...] = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

#: The 80 category ids that exist in COCO 2017, ascending.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i, n in enumerate(COCO_CLASSES) if n != "N/A")
