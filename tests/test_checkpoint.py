"""Checkpoint I/O: official key mapping, dinodet files, safety and clear errors."""
import argparse
import json
import pickle

import pytest
import torch
from conftest import OFFICIAL

from dinodet.checkpoint import CheckpointError, init_from_config, load_checkpoint, save_checkpoint
from dinodet.compat.official_args import config_from_official_args
from dinodet.compat.official_keys import official_key_map, to_official
from dinodet.models import build_model
from dinodet.presets import get_preset


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    return cfg, build_model(cfg)


def _official(cfg, model):
    return to_official(model.state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["DINO_4scale", "DINO_5scale"])
def test_official_key_names_match_reference_listing(name):
    listing = OFFICIAL / f"{name}.keys.tsv"
    rows = [line.split("\t") for line in listing.read_text().splitlines()[1:]]
    preset = {"DINO_4scale": "dino_r50_4scale", "DINO_5scale": "dino_r50_5scale"}[name]
    cfg = get_preset(preset)
    model = build_model(cfg)
    state = model.state_dict()
    key_map = official_key_map(list(state), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    assert set(key_map) == {r[0] for r in rows}
    for key, shape, _dtype, _alias in rows:
        assert "x".join(map(str, state[key_map[key]].shape)) == shape, key


@pytest.mark.parametrize("name", ["DINO_4scale", "DINO_5scale"])
def test_official_args_give_the_preset(name):
    path = OFFICIAL / f"{name}.args.json"
    cfg = config_from_official_args(json.loads(path.read_text()))
    preset = get_preset({"DINO_4scale": "dino_r50_4scale", "DINO_5scale": "dino_r50_5scale"}[name])
    assert cfg.model == preset.model
    assert cfg.loss == preset.loss


@pytest.mark.parametrize("name, preset", [("DINO_4scale", "dino_r50_4scale"), ("DINO_5scale", "dino_r50_5scale"),
                                          ("DINO_4scale_swin", "dino_swinl_4scale"),
                                          ("DINO_5scale_swin", "dino_swinl_5scale")])
def test_preset_schedules_follow_the_official_configs(name, preset):
    path = OFFICIAL / f"{name}.args.json"
    args, t = json.loads(path.read_text()), get_preset(preset).train
    assert (t.batch_size, t.lr, t.lr_backbone, t.weight_decay, t.epochs, t.lr_drop, t.clip_max_norm) == (
        args["batch_size"], args["lr"], args["lr_backbone"], args["weight_decay"], args["epochs"], args["lr_drop"],
        args["clip_max_norm"])


def test_official_round_trip(tmp_path, tiny_model):
    cfg, model = tiny_model
    path = tmp_path / "official.pth"
    torch.save({"model": _official(cfg, model), "args": argparse.Namespace(num_classes=91), "epoch": 3}, path)
    loaded = load_checkpoint(path, preset="tiny")
    assert loaded.source == "official"
    _assert_same_weights(loaded.model, model)
    assert not loaded.model.training


def test_official_missing_and_unknown_keys_are_named(tmp_path, tiny_model):
    cfg, model = tiny_model
    state = _official(cfg, model)
    del state["transformer.enc_output_norm.weight"]
    state["input_proj.1.1.mystery"] = state.pop("input_proj.1.1.bias")
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, preset="tiny")
    msg = str(e.value)
    assert "transformer.enc_output_norm.weight" in msg and "input_proj.1.1.mystery" in msg
    assert "\n" not in msg


def test_shared_head_copies_must_agree(tmp_path, tiny_model):
    cfg, model = tiny_model
    state = _official(cfg, model)
    state["class_embed.1.bias"] = state["class_embed.1.bias"] + 1
    path = tmp_path / "alias.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="class_embed.1.bias"):
        load_checkpoint(path, preset="tiny")


def test_wrong_preset_is_reported(tmp_path):
    cfg4 = get_preset("dino_r50_4scale")
    model = build_model(cfg4)
    path = tmp_path / "r50.pth"
    torch.save({"model": _official(cfg4, model)}, path)
    with pytest.raises(CheckpointError, match="input_proj.4"):
        load_checkpoint(path, preset="dino_r50_5scale")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".SAFETENSORS"])
def test_dinodet_round_trip(tmp_path, tiny_model, suffix):
    cfg, model = tiny_model
    path = save_checkpoint(tmp_path / f"m{suffix}", model, cfg, class_names=["a", "b"], category_ids=[3, 7])
    loaded = load_checkpoint(path)
    assert loaded.config == cfg and loaded.source == "dinodet"
    assert loaded.class_names == ["a", "b"] and loaded.category_ids == [3, 7]
    _assert_same_weights(loaded.model, model)
    with pytest.raises(CheckpointError, match="preset 'tiny'"):
        load_checkpoint(path, preset="dino_r50_4scale")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, f, pickle_protocol=2)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    # names what was refused, and never passes on torch's advice to load with weights_only=False
    assert "refused" in str(err.value) and "GLOBAL print" in str(err.value)
    assert "weights_only" not in str(err.value)
    raw = tmp_path / "evil.pkl"  # a plain pickle (no zip container)
    raw.write_bytes(pickle.dumps({"payload": _Evil()}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(raw)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("content, fragment", [
    (b"definitely not a checkpoint", "not a PyTorch checkpoint (it starts with 'definitely not a checkpo')"),
    (b"this is a text file\n", "not a PyTorch checkpoint (it starts with 'this is a text file')"),
    (b"<!DOCTYPE html><html>404</html>", "not a PyTorch checkpoint (it starts with '<!DOCTYPE html>"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
    (b"", "not a PyTorch checkpoint (empty)"),
    (b"\x80\x02garbage after a pickle header", "Unsupported operand"),
    (b"PK\x03\x04 a truncated zip", "not a readable checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, fragment):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(junk)
    assert str(err.value).startswith(f"{junk}: ") and fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_dinodet_checkpoints(tmp_path, tiny_model):
    cfg, model = tiny_model
    good = torch.load(save_checkpoint(tmp_path / "m.pt", model, cfg), weights_only=True)
    for name, bad, fragment in [("nomodel", {k: v for k, v in good.items() if k != "model"}, "'model' state dict"),
                                ("listmodel", {**good, "model": [1, 2]}, "'model' state dict"),
                                ("names", {**good, "class_names": "a,b"}, "'class_names' must be a list")]:
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=fragment):
            load_checkpoint(tmp_path / f"{name}.pt")

    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata={"format": good["format"], "config": good["config"],
                                                              "class_names": "[not json"})
    with pytest.raises(CheckpointError, match="invalid class metadata"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_backbone_checkpoint_is_loaded(tmp_path):
    import torchvision

    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    cfg = get_preset("tiny")
    cfg.model.backbone.checkpoint = str(path)
    with pytest.raises(CheckpointError, match="set model.backbone.norm=frozen_bn"):
        init_from_config(cfg)  # tiny trains from scratch with GroupNorm: BN statistics have no place to go
    cfg.model.backbone.norm = "frozen_bn"
    model = init_from_config(cfg)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.body.bn1.running_var, ref.bn1.running_var)


def test_checkpoint_files_get_the_umask_permissions(tmp_path, tiny_model):
    import os

    cfg, model = tiny_model
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.pt", model, cfg)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600


# an official checkpoint is loaded without --preset: the config comes from its stored args
def test_official_checkpoint_without_preset_uses_its_args(tmp_path):
    from dinodet.checkpoint import CheckpointError, load_checkpoint
    from dinodet.compat.official_keys import to_official
    from dinodet.inference.detector import Detector
    from dinodet.presets import get_preset

    args = json.loads((OFFICIAL / "DINO_4scale.args.json").read_text())
    cfg = get_preset("dino_r50_4scale")
    torch.manual_seed(0)
    model = build_model(cfg)
    state = to_official(model.state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    torch.save({"model": state, "args": argparse.Namespace(**args), "epoch": 11}, tmp_path / "ckpt.pth")
    loaded = load_checkpoint(tmp_path / "ckpt.pth")  # no preset
    assert loaded.source == "official" and loaded.config.model == cfg.model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    det = Detector.from_checkpoint(tmp_path / "ckpt.pth")
    assert (det.size, det.max_size) == (800, 1333) and det.class_names[1] == "person"
    torch.save(state, tmp_path / "bare.pth")  # a bare state dict: no args to build the model from
    with pytest.raises(CheckpointError, match="without stored args; pass --preset"):
        load_checkpoint(tmp_path / "bare.pth")


def test_a_custom_config_loads_under_its_own_name(tmp_path):
    cfg = get_preset("tiny")
    cfg.name = "custom"
    path = save_checkpoint(tmp_path / "custom.pt", build_model(cfg), cfg)
    assert load_checkpoint(path, preset="custom").config.name == "custom"
    with pytest.raises(CheckpointError, match="made with preset 'custom', not 'tiny'"):
        load_checkpoint(path, preset="tiny")


def test_weights_for_an_architecture_keep_the_files_class_count(tiny_model, tmp_path):
    """What fine-tuning starts from: an official file read into the asked architecture with its own
    91 classes; a dinodet file with its classes; a file without class head is one error."""
    from dinodet.checkpoint import load_weights_for_architecture
    from dinodet.engine.train import resolve_config

    cfg, model = tiny_model
    torch.save({"model": _official(cfg, model)}, tmp_path / "official.pth")
    target = resolve_config(cfg, 3).model  # the fine-tuning run's architecture, another class count
    got = load_weights_for_architecture(target, "tiny", tmp_path / "official.pth")
    assert (got.num_classes, got.class_names, got.category_ids) == (91, None, None)
    for k, v in model.state_dict().items():
        assert torch.equal(got.state[k], v), k

    small = build_model(resolve_config(cfg, 2))
    save_checkpoint(tmp_path / "own.safetensors", small, resolve_config(cfg, 2), ["a", "b"], [4, 5])
    own = load_weights_for_architecture(target, "tiny", tmp_path / "own.safetensors")
    assert (own.num_classes, own.class_names, own.category_ids) == (2, ["a", "b"], [4, 5])

    headless = {k: v for k, v in _official(cfg, model).items() if "class_embed" not in k}
    torch.save({"model": headless}, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError, match=r"headless.pth: official checkpoint without .*class_embed"):
        load_weights_for_architecture(target, "tiny", tmp_path / "headless.pth")


def test_a_fifo_or_a_link_loop_is_not_called_missing(tmp_path):
    import os

    fifo, loop = tmp_path / "pipe.pt", tmp_path / "loop.pt"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match=r"pipe\.pt: not a regular file \(a FIFO\)"):
        load_checkpoint(fifo)  # refused without opening it (opening a FIFO would block)
    with pytest.raises(CheckpointError, match=r"loop\.pt: a symbolic link loop"):
        load_checkpoint(loop)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
