"""``engine.data_check.check_data``: the check-data workflow, split by split."""
from pathlib import Path

import pytest

from dinodet.data.splits import DataSpec
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.data_check import check_data
from dinodet.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=3, num_val=2, image_size=(64, 64), seed=0)


def test_each_split_is_reported_and_drawn_only_with_an_output_folder(shapes: Path, tmp_path: Path):
    checked = list(check_data(DataSpec(str(shapes))))
    assert [(c.split, c.report.usable_images, c.pictures) for c in checked] == [("train", 3, None), ("val", 2, None)]
    (val,) = check_data(DataSpec(str(shapes)), ["val"], out_dir=tmp_path / "out", pictures=1)
    assert val.pictures is not None and val.pictures.count == 1 and val.pictures.chart.is_file()
    assert len(list(val.pictures.folder.glob("*.jpg"))) == 1


def test_bad_options_fail_before_any_split(shapes: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="--pictures must be >= 0"):
        next(check_data(DataSpec(str(shapes)), pictures=-1))
    with pytest.raises(DatasetError):
        next(check_data(DataSpec(str(tmp_path / "nothing"))))
