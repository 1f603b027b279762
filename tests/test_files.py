"""Atomic JSON result files (``dinodet.files``)."""
import json
import os

import pytest

from dinodet.files import json_text, write_json_atomic


def test_lists_one_element_per_line_and_dicts_indented(tmp_path):
    records = [{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.25}]
    write_json_atomic(tmp_path / "r.json", records)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == records and text.splitlines()[1] == json.dumps(records[0]) + ","
    assert json.loads(json_text([])) == []
    assert json_text({"AP": 0.5}) == '{\n  "AP": 0.5\n}\n'


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"AP": 0.5})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"AP": object()})  # not serialisable: fails halfway through
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_images_are_written_atomically_in_the_format_of_their_name(tmp_path):
    from PIL import Image

    from dinodet.files import save_image_atomic

    path = tmp_path / "picture.jpg"
    save_image_atomic(Image.new("RGB", (8, 6), "red"), path, quality=90)
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (8, 6)
    with pytest.raises(TypeError):
        save_image_atomic(Image.new("RGB", (8, 6)), path, quality=90, subsampling="bogus")  # fails in the writer
    with Image.open(path) as im:
        assert im.format == "JPEG"  # the earlier picture is intact
    assert sorted(os.listdir(tmp_path)) == ["picture.jpg"]


def test_errors_name_the_target_not_the_temporary_file(tmp_path):
    target = tmp_path / "missing_folder" / "metrics.json"
    with pytest.raises(OSError) as err:
        write_json_atomic(target, {"AP": 0.5})
    assert err.value.filename == str(target) and ".tmp" not in str(err.value)


def test_a_name_near_the_length_limit_is_written(tmp_path):
    target = tmp_path / ("x" * 240 + ".json")  # fits (255 bytes), but ".<name>.<pid>.tmp.json" would not
    write_json_atomic(target, [1])
    assert json.loads(target.read_text()) == [1] and os.listdir(tmp_path) == [target.name]


def test_only_files_the_manifest_lists_are_dinodets(tmp_path):
    from dinodet.errors import ConfigError
    from dinodet.files import OUTPUTS_MANIFEST, check_not_foreign, dinodet_outputs, record_outputs, remove_outputs

    (tmp_path / "mine.jpg").write_bytes(b"mine")
    (tmp_path / "a.jpg").write_bytes(b"ours")
    check_not_foreign(tmp_path, ["a.jpg", "new.jpg"], overwrite=True)
    with pytest.raises(ConfigError, match=r"^--out '.*' holds 'a.jpg', which dinodet did not write; choose another "
                                          r"folder or pass --overwrite$"):
        check_not_foreign(tmp_path, ["new.jpg", "a.jpg", "mine.jpg"])
    record_outputs(tmp_path, ["a.jpg", "b.jpg"], "predict")
    assert dinodet_outputs(tmp_path) == {"a.jpg": "predict", "b.jpg": "predict"}
    check_not_foreign(tmp_path, ["a.jpg", "b.jpg", "new.jpg"])  # dinodet's own and new files: fine
    with pytest.raises(ConfigError, match="'mine.jpg'"):
        check_not_foreign(tmp_path, ["a.jpg", "mine.jpg"])
    remove_outputs(tmp_path, keep=["b.jpg"])  # a.jpg was an earlier run's; mine.jpg is not dinodet's
    assert sorted(os.listdir(tmp_path)) == [OUTPUTS_MANIFEST, "mine.jpg"]
    assert dinodet_outputs(tmp_path) == {"b.jpg": "predict"}
    # a manifest that is broken, or names a file outside its folder, proves nothing
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / OUTPUTS_MANIFEST).write_text(json.dumps({"files": {"../mine.jpg": "eval", "x": 3}}))
    assert dinodet_outputs(tmp_path / "sub") == {}
    remove_outputs(tmp_path / "sub", keep=[])
    assert (tmp_path / "mine.jpg").read_bytes() == b"mine"
    (tmp_path / OUTPUTS_MANIFEST).write_text("{not json")
    assert dinodet_outputs(tmp_path) == {}


def test_an_output_file_is_checked_before_the_work(tmp_path):
    from dinodet.errors import ConfigError
    from dinodet.files import check_out_file

    check_out_file(tmp_path / "new" / "model.onnx")
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(ConfigError, match="model.onnx' is a folder; it must be a file name"):
        check_out_file(tmp_path / "model.onnx")
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="its folder '.*f' is a file"):
        check_out_file(tmp_path / "f" / "model.onnx")
