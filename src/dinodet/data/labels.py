"""Mapping between a dataset's own category ids and contiguous training class indices.

The detector predicts classes ``0..C-1``; datasets use arbitrary ids (COCO: 1..90 with gaps, YOLO:
0..C-1).  ``LabelMap`` is that mapping.  It is stored in checkpoints (``to_dict``) so predictions
come back with the dataset's own ids and names, and a validation split or a fine-tuning run reuses
the training split's mapping instead of deriving a possibly different one.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LabelMap:
    """``class_names[i]`` / ``category_ids[i]``: name and dataset id of training class ``i``."""

    class_names: list[str]
    category_ids: list[int]
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.category_ids = [int(c) for c in self.category_ids]
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(f"LabelMap: {len(self.class_names)} names but {len(self.category_ids)} category ids")
        if not self.category_ids:
            raise ValueError("LabelMap: a dataset needs at least one category")
        self._index = {}
        for i, cid in enumerate(self.category_ids):
            if cid in self._index:
                raise ValueError(f"LabelMap: category id {cid} appears twice")
            self._index[cid] = i

    @property
    def num_classes(self) -> int:
        """Number of training classes C (the classifier width / denoising label book size)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.category_ids)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._index

    def index_of(self, category_id: int) -> int:
        """Contiguous class index of dataset ``category_id``.

        Raises:
            KeyError: the id is not part of this mapping.
        """
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in the label map") from None

    def get_index(self, category_id: int) -> int | None:
        """Like ``index_of`` but ``None`` for an unknown id."""
        return self._index.get(int(category_id))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form stored in checkpoints."""
        return {"class_names": list(self.class_names), "category_ids": list(self.category_ids)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelMap:
        try:
            return cls(class_names=list(d["class_names"]), category_ids=list(d["category_ids"]))
        except KeyError as e:
            raise ValueError(f"label map dict lacks key {e}") from None

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, Any]]) -> LabelMap:
        """From COCO ``categories`` entries (``{'id', 'name'}``), in increasing id order."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(class_names=[str(c.get("name", c["id"])) for c in cats], category_ids=[int(c["id"]) for c in cats])

    @classmethod
    def from_names(cls, names: Sequence[str], first_id: int = 0) -> LabelMap:
        """Names in index order; ids ``first_id, first_id+1, ...`` (YOLO: ``first_id=0``)."""
        return cls(class_names=list(names), category_ids=list(range(first_id, first_id + len(names))))

    def categories(self) -> list[dict[str, Any]]:
        """COCO ``categories`` entries for this mapping."""
        return [{"id": cid, "name": name, "supercategory": ""} for cid, name in zip(self.category_ids, self.class_names)]
