"""Counting and describing data problems (``DataReport``).

Every dataset loader and the pre-flight check (``dinodet.data.checks``) fill one ``DataReport``:
a counter per kind of problem plus a bounded list of per-file messages, so a long run can skip bad
items and still say exactly what it skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import DatasetError

# (field, description, is_problem): the order is the order of ``summary()``.  Problems are things
# that were dropped or altered; the others are informational counts.
_COUNTERS: tuple[tuple[str, str, bool], ...] = (
    ("images", "images", False),
    ("boxes", "training boxes", False),
    ("images_without_boxes", "images without boxes (kept as negatives)", False),
    ("crowd_ignored", "crowd/difficult annotations (not trained on, ignored in evaluation)", False),
    ("missing_files", "missing image files (skipped)", True),
    ("unreadable_images", "unreadable/corrupt images (skipped)", True),
    ("size_mismatch", "images whose size differs from the annotation file (resized to it)", True),
    ("exif_reoriented", "EXIF-rotated images kept in stored orientation (annotations refer to it)", False),
    ("non_rgb_images", "non-RGB images (grayscale/CMYK/RGBA/palette, converted to RGB)", False),
    ("boxes_clipped", "boxes extending outside the image (clipped)", True),
    ("boxes_dropped_degenerate", "zero/negative-area boxes (dropped)", True),
    ("boxes_outside", "boxes entirely outside the image (dropped)", True),
    ("unknown_category", "boxes with an unknown category id (skipped)", True),
    ("invalid_annotations", "malformed annotations/label lines (skipped)", True),
    ("ambiguous_label_lines", "label lines read as a triangle or a pose label (check them: a box with extra values?)",
     True),
    ("orphan_annotations", "annotations or label files without an image (skipped)", True),
)


@dataclass
class DataReport:
    """Counts of what a dataset scan found, plus per-file messages.

    ``messages`` keeps the first ``max_messages`` lines; later ones are only counted in
    ``messages_suppressed`` so a dataset with millions of small defects cannot exhaust memory.
    """

    images: int = 0
    boxes: int = 0
    images_without_boxes: int = 0
    crowd_ignored: int = 0
    missing_files: int = 0
    unreadable_images: int = 0
    size_mismatch: int = 0
    exif_reoriented: int = 0
    non_rgb_images: int = 0
    boxes_clipped: int = 0
    boxes_dropped_degenerate: int = 0
    boxes_outside: int = 0
    unknown_category: int = 0
    invalid_annotations: int = 0
    ambiguous_label_lines: int = 0
    orphan_annotations: int = 0
    messages: list[str] = field(default_factory=list)
    messages_suppressed: int = 0
    max_messages: int = 500
    source: str = ""  # what was scanned, e.g. the annotation file
    num_classes: int = 0  # classes of the label map used (0: not known yet)

    def add(self, counter: str, message: str | None = None, n: int = 1) -> None:
        """Increase ``counter`` by ``n`` and record ``message`` (if any)."""
        if counter not in _FIELD_NAMES:
            raise KeyError(f"unknown DataReport counter '{counter}'")
        setattr(self, counter, getattr(self, counter) + n)
        if message is not None:
            self.note(message)

    def note(self, message: str) -> None:
        """Record a message without counting anything."""
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        else:
            self.messages_suppressed += 1

    @property
    def num_problems(self) -> int:
        """Total of the counters that mean something was dropped or altered."""
        return sum(getattr(self, name) for name, _, problem in _COUNTERS if problem)

    @property
    def usable_images(self) -> int:
        """Indexed images not found unreadable (so far: only opened images can be found so)."""
        return self.images - self.unreadable_images

    @property
    def ok(self) -> bool:
        return self.num_problems == 0

    @property
    def no_boxes(self) -> bool:
        """Usable images but not one box: every image a negative, nothing to learn or score (labels
        in the wrong place or format, typically), though each file on its own looks fine."""
        return self.usable_images > 0 and self.boxes == 0

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _, _ in _COUNTERS}

    def summary(self) -> str:
        """One line per non-zero counter (images and boxes always), e.g. ``'  3 missing image files (skipped)'``."""
        lines = []
        for name, desc, _ in _COUNTERS:
            value = getattr(self, name)
            if value or name in ("images", "boxes"):
                lines.append(f"{value:>8d} {desc}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



class SplitNotFoundError(DatasetError):
    """A split's files are in none of the places the layout allows (the split may simply not exist)."""


_FIELD_NAMES = frozenset(name for name, _, _ in _COUNTERS)
