"""``dinodet check-data``: what training would skip or fix in each split, and, with an output
folder, pictures of the labels to check by eye."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.checks import check_dataset
from ..data.coco import check_data_root
from ..data.report import DataReport
from ..data.splits import DataSpec, split_exists
from ..errors import ConfigError
from .pictures import DataPictures, check_data_out, write_data_pictures


@dataclass(frozen=True)
class SplitCheck:
    """One split's findings; ``pictures`` is what was drawn (with an output folder, for a split with
    usable images)."""

    split: str
    report: DataReport
    pictures: DataPictures | None = None


def check_data(spec: DataSpec, splits: Sequence[str] | None = None, *, decode: bool = False,
               out_dir: str | Path | None = None, pictures: int = 16, overwrite: bool = False) -> Iterator[SplitCheck]:
    """Check ``splits`` of ``spec`` (default: its train split, and its val split when there is one),
    one at a time, so that a caller can report each as it is done.  ``decode`` also decodes every
    image (slower; finds truncated files).  With ``out_dir``, each split's first ``pictures`` images
    are drawn with their boxes (see ``engine.pictures.write_data_pictures``); files dinodet did not
    write there are replaced only with ``overwrite``.

    Raises (before the first split):
        DatasetError: no dataset at ``spec.root``; ConfigError: a bad ``pictures`` or ``out_dir``.
    """
    if pictures < 0:
        raise ConfigError(f"--pictures must be >= 0, got {pictures}")
    check_data_root(spec.root)
    if not splits:
        splits = [spec.train_split] + ([spec.val_split] if split_exists(spec, spec.val_split) else [])
    if out_dir is not None:
        check_data_out(out_dir, splits, overwrite=overwrite)
    for split in splits:
        report = check_dataset(spec.root, spec.format, split, decode=decode)
        drawn = None
        if out_dir is not None and report.usable_images > 0:
            drawn = write_data_pictures(spec.root, split, out_dir, format=spec.format, pictures=pictures,
                                        overwrite=overwrite)
        yield SplitCheck(split, report, drawn)
