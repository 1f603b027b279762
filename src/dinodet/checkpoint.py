"""Checkpoint I/O: official DINO checkpoints and dinodet's own files.

A checkpoint is untrusted input: torch files are read with ``weights_only=True`` (only
``argparse.Namespace`` is allow-listed, because official checkpoints carry their args in one), and
dinodet writes safetensors or weights-only torch files with the config stored alongside as JSON.
Before a model is built for a file, its weights must be finite (``check_finite``: a NaN model
scores boxes that COCOeval counts as matches) and their names and shapes must be those of the
model its config describes, checked on a model built without memory (``_skeleton``): what a file
can make dinodet allocate is what the file holds, whatever sizes its config claims.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .compat.official_args import config_from_official_args
from .compat.official_keys import (
    is_official_state,
    official_key_map,
    official_names,
    official_state,
    original_backbone_name,
)
from .config import ConfigError, DINOConfig, ModelConfig, check_config
from .data.images import describe_unreadable
from .errors import CheckpointError, first_line
from .files import write_atomic
from .models.backbones import backbone_family
from .models.build import build_model
from .models.dino import DINO
from .presets import get_preset

FORMAT_TAG = "dinodet-checkpoint-v1"


@dataclass
class LoadedCheckpoint:
    """A checkpoint read by ``load_checkpoint``: the model built and loaded (eval mode), its config
    and label map, and what else the file carried."""

    model: DINO
    config: DINOConfig
    class_names: list[str] | None = None
    category_ids: list[int] | None = None  # category id of each class index; None: index == id
    source: str = "dinodet"  # "dinodet" or "official"
    extra: dict[str, Any] | None = None  # anything else stored in the file (optimizer state, epoch...)
    path: str = ""  # the file it was read from (for messages)
    ema_weights: bool = False  # the model holds a training run's EMA weights (see load_checkpoint's ema)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTO = 0x80  # first byte of a protocol-2+ pickle: torch's legacy format, raw pickles


def read_torch_file(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True (argparse.Namespace allowed); errors become CheckpointError.

    The file is untrusted input: whatever it holds, the outcome is its content or one
    CheckpointError line saying what the file is or which object was refused."""
    path = Path(path)
    check_checkpoint_path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (fetch them with `git lfs pull`)")
    if not head.startswith(_ZIP_MAGIC) and not (head and head[0] == _PICKLE_PROTO):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_what_file(path, head)})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": noise here
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, a weights-only checkpoint may not contain this "
                              f"({_unpickler_reason(str(e))})") from None
    except Exception as e:  # noqa: BLE001 -- a crafted or damaged file can fail the unpickler in any way
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None


def check_checkpoint_path(path: Path) -> None:
    """CheckpointError unless ``path`` is an existing regular file (a FIFO or a symbolic-link loop
    is named as such, not as missing)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    problem = describe_unreadable(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint not found: {path}" if problem == "no such file" else f"{path}: {problem}")


# file signatures people mistake for checkpoints, with what to do instead
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file (a Keras/TensorFlow model?)"),
)


def _what_file(path: Path, head: bytes) -> str:
    """A short description of a file that is not a torch checkpoint, from its name and first bytes."""
    if not head:
        return "empty"
    if path.suffix.lower() == ".onnx":
        return "an ONNX model; `dinodet predict --model` runs it (Python: OnnxDetector)"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if path.suffix.lower() == ".safetensors":
        return "not a readable safetensors file either"
    start = head[:24].decode("utf-8", "replace").split("\n")[0].strip()
    if start.isprintable() and start:
        return f"it starts with {start!r}"
    return "unknown binary data"


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only refusal that names what was refused (not its advice to
    load with weights_only=False, which would execute the file's code)."""
    advice = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file")
    for line in message.splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and not line.startswith(advice):
            return line.split(". ")[0].rstrip(".")  # e.g. "Unsupported global: GLOBAL print was not ..."
    return "an object outside the allowed types"


def _namespace_to_dict(args: Any) -> dict[str, Any] | None:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    return None


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def key_problems(missing: list[str], unexpected: list[str]) -> str:
    """'missing keys: ...; unexpected keys: ...' (only the parts that apply)."""
    parts = [f"missing keys: {_summarise(missing)}"] if missing else []
    if unexpected:
        parts.append(f"unexpected keys: {_summarise(unexpected)}")
    return "; ".join(parts)


def official_weights(model: DINO, state: dict[str, Tensor], path: str | os.PathLike) -> dict[str, Tensor]:
    """An official-format state dict in ``model``'s parameter names, checked to fit it exactly (every
    key accounted for, shapes equal); ``model`` may be a ``_skeleton``."""
    cfg = model.cfg
    key_map = official_key_map(list(model.state_dict()), cfg.dec_layers, len(cfg.backbone.return_layers))
    missing = [k for k in key_map if k not in state]
    unexpected = [k for k in state if k not in key_map]
    if missing or unexpected:
        problems = key_problems(missing, unexpected)
        raise CheckpointError(f"{path}: does not match {_architecture(model)}: {problems}")
    ours: dict[str, Tensor] = {}
    for off, k in key_map.items():
        v = state[off]
        if k in ours:
            # aliases of one shared head must hold the same values
            if ours[k].shape != v.shape or not torch.equal(ours[k], v):
                raise CheckpointError(f"{path}: {off} differs from the other copies of the shared head {k}")
            continue
        ours[k] = v
    _check_fits(model.state_dict(), ours, path, name_of=lambda k: next(o for o, d in key_map.items() if d == k))
    return ours


def _architecture(model: DINO) -> str:
    name = model.preset_name  # official files without --preset are built from their stored args
    return f"the architecture its stored args describe ({name})" if name.startswith("official") else f"preset '{name}'"


def _check_fits(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], path,
                name_of: Callable[[str], str] = lambda k: k,
                hint: str = "wrong --preset or class count for this checkpoint?") -> None:
    """CheckpointError unless ``state`` has exactly the keys and shapes of ``expected`` (a model's
    state dict, possibly of a ``_skeleton``); ``name_of`` gives a key's name in the file."""
    for k, v in state.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: {name_of(k)} has shape {tuple(v.shape)} but the model expects {tuple(expected[k].shape)} "
                f"({hint})")
    missing = [name_of(k) for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: " + key_problems(missing, unexpected))


def _load_exact(model: nn.Module, state: dict[str, Tensor], path, hint: str) -> None:
    _check_fits(model.state_dict(), state, path, hint=hint)
    model.load_state_dict(state)


def _skeleton(cfg: DINOConfig, path: str | os.PathLike) -> DINO:
    """``cfg``'s model on the meta device: its parameter names and shapes, without allocating them
    (a fraction of a real build's time), to check the file ``path`` against before building the real
    one.  Settings that do not fit together are the file's fault: CheckpointError."""
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_finite(state: Mapping[str, Any], path: str | os.PathLike, what: str = "") -> None:
    """CheckpointError naming the first floating-point tensor of ``state`` that holds NaN or inf.

    Such weights make every output NaN: predict would find nothing, and COCOeval counts NaN boxes
    as matches (a broken model scores AP > 0).  ``what`` prefixes the key (e.g. "EMA weights ")."""
    for k, v in state.items():
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: {what}{k} holds non-finite values (NaN or inf); the weights are "
                                  "broken (a training run that diverged?)")


def init_from_config(cfg: DINOConfig) -> DINO:
    """``cfg``'s model as a training run starts it: built by ``models.build_model``, with the
    ImageNet backbone weights that ``cfg.model.backbone.checkpoint`` names, if any."""
    model = build_model(cfg)
    if cfg.model.backbone.checkpoint:
        load_backbone_weights(model, cfg.model.backbone.checkpoint)
    return model


def load_backbone_weights(model: DINO, path: str | os.PathLike) -> None:
    """Load an ImageNet classification checkpoint into the backbone (``--backbone-checkpoint``).

    The weights may sit at the top level or under 'model' / 'state_dict' (as in the original Swin and
    ConvNeXt releases, e.g. ``swin_large_patch4_window12_384_22k.pth``); a 'module.' prefix is
    dropped.  Accepted layouts: torchvision ResNet; original Swin (microsoft/Swin-Transformer) or
    timm Swin; original ConvNeXt (facebookresearch/ConvNeXt) or timm ConvNeXt.  The classifier
    (``head.*``, ``fc.*``), the final classification norm (``norm.*``) and Swin's cached ``attn_mask``
    buffers are ignored; DINO's per-stage output norms ``norm{i}`` are not part of ImageNet
    checkpoints and keep their initialisation.  Anything else missing, unexpected or of the wrong
    shape is a CheckpointError naming the keys.
    """
    obj = read_torch_file(path)
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        obj = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: no state dict found")
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found")
    check_finite(state, path)
    if is_official_state(state):
        raise CheckpointError(f"{path}: this is a complete DINO checkpoint, not an ImageNet backbone checkpoint "
                              "(load it as the detector checkpoint instead)")
    bcfg = model.cfg.backbone
    family = backbone_family(bcfg.name)
    if family == "resnet":
        state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        if bcfg.norm == "gn" and any(k.endswith("running_mean") for k in state):
            raise CheckpointError(f"{path}: ImageNet ResNet weights carry BatchNorm statistics but the backbone uses "
                                  "GroupNorm; set model.backbone.norm=frozen_bn to load them")
        _load_exact(model.backbone.body, state, path, "weights of another backbone than the preset's?")
        return
    _load_imagenet_trunk(model.backbone.body, state, path, family, bcfg)


def _load_imagenet_trunk(body: nn.Module, state: dict[str, Tensor], path, family: str, bcfg) -> None:
    """Swin / ConvNeXt ImageNet weights (original or timm layout) -> ``backbone.body``."""
    ours = body.state_dict()
    from_original = {original_backbone_name(k): k for k in ours}
    if family == "swin" and not any(re.match(r"layers\.0\.downsample\.", k) for k in state) \
            and any(re.match(r"layers\.[1-9]\.downsample\.", k) for k in state):
        # timm layout: the patch merging opens the next stage instead of closing the previous one
        state = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v
                 for k, v in state.items()}
    ignore = [r"^head\.", r"^fc\.", r"^norm\.", r"^norm_pre\.", r"\.attn_mask$"]
    may_miss = [r"^norm\d+\.", r"\.relative_position_index$"]  # DINO's output norms; a fixed index buffer
    if family == "swin" and bcfg.dilation:
        # as the official build: the dilated last stage has other shapes and is trained from scratch
        ignore += [r"^layers\.3\.", r"^layers\.2\.downsample\."]
        may_miss += [r"^layers\.3\."]
    mapped: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    unexpected = []
    for k, v in state.items():
        if any(re.search(p, k) for p in ignore):
            continue
        target = from_original.get(k, k if k in ours else None)
        if target is None:
            unexpected.append(k)
            continue
        mapped[target], names[target] = v, k
    missing = [k for k in ours if k not in mapped and not any(re.search(p, k) for p in may_miss)]
    what = f"backbone '{bcfg.name}'" + (f" (window_size {bcfg.window_size})" if family == "swin" else "")
    if missing or unexpected:
        problems = key_problems([original_backbone_name(k) for k in missing], unexpected)
        raise CheckpointError(f"{path}: does not fit {what}: " + problems)
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            hint = " (another window size?)" if "relative_position" in k else ""
            raise CheckpointError(f"{path}: {names[k]} has shape {tuple(v.shape)} but {what} expects "
                                  f"{tuple(ours[k].shape)}{hint}")
    body.load_state_dict(mapped, strict=False)


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The raw content of a training checkpoint (RUN_DIR/checkpoint.pt), validated."""
    path = Path(path)
    obj = read_torch_file(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_TAG or "optimizer" not in obj:
        raise CheckpointError(f"{path}: not a dinodet training checkpoint (no optimizer state); "
                              "use --finetune-from to start from plain weights")
    for what, state in (("", obj.get("model")), ("EMA weights ", (obj.get("ema") or {}).get("module"))):
        if isinstance(state, dict):
            check_finite(state, path, what)
    return obj


def use_ema_weights(ckpt: LoadedCheckpoint) -> bool:
    """Put the EMA weights of a training checkpoint (RUN_DIR/checkpoint.pt with train.ema on) into
    ``ckpt.model``: they are the weights training evaluated.  Returns whether the file had any."""
    ema = (ckpt.extra or {}).get("ema")
    if not ema:
        return False
    try:
        check_finite(ema["module"], ckpt.path, "EMA weights ")
        result = ckpt.model.load_state_dict(ema["module"], strict=False)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), type(e).__name__)
        raise CheckpointError(f"{ckpt.path}: damaged EMA weights ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{ckpt.path}: damaged EMA weights ("
                              + key_problems(result.missing_keys, result.unexpected_keys) + ")")
    return True


def load_checkpoint(path: str | os.PathLike, preset: str | None = None, device: str | torch.device = "cpu",
                    ema: bool = False) -> LoadedCheckpoint:
    """Load an official DINO checkpoint or a dinodet checkpoint and build the matching model.

    For official files the config comes from ``preset`` if given, else from the args stored in the
    file.  dinodet files carry their own config (``preset`` then only has to agree with it).  With
    ``ema``, a training run's checkpoint.pt gives its EMA weights, the ones training evaluated
    (``use_ema_weights``); ``ema_weights`` of the result says whether the model holds EMA weights
    (checkpoint_best.pt of an EMA run stores them as its weights).
    """
    path = Path(path)
    return _load_checkpoint(path, None if path.suffix.lower() == ".safetensors" else read_torch_file(path), preset,
                            device, ema)


def _load_checkpoint(path: Path, obj: Any, preset: str | None, device: str | torch.device,
                     ema: bool) -> LoadedCheckpoint:
    """``load_checkpoint`` of a torch file's content ``obj`` (unused for a safetensors file)."""
    if path.suffix.lower() == ".safetensors":
        loaded = _load_safetensors(path)
    else:
        if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
            loaded = _load_dinodet(obj, path)
        elif (state := official_state(obj)) is not None:
            loaded = _load_official(obj if state is not obj else {"model": obj}, path, preset)
        else:
            raise CheckpointError(f"{path}: neither an official DINO checkpoint nor a dinodet checkpoint")
    if preset is not None and loaded.source == "dinodet" and preset != loaded.config.name:
        get_preset(preset)  # an unknown name says so (a ConfigError) rather than "not made with it"
        raise CheckpointError(f"{path}: checkpoint was made with preset '{loaded.config.name}', not '{preset}'")
    loaded.path = str(path)
    if ema:
        loaded.ema_weights = use_ema_weights(loaded) or bool((loaded.extra or {}).get("ema_weights"))
    loaded.model.to(device).eval()
    return loaded


@dataclass
class ArchitectureWeights:
    """A checkpoint's weights (dinodet parameter names) for one architecture, with the file's own
    class layout: what fine-tuning starts from."""

    state: dict[str, Tensor]
    num_classes: int
    class_names: list[str] | None = None  # None: the file does not name its classes (official files)
    category_ids: list[int] | None = None


def load_weights_for_architecture(model_cfg: ModelConfig, preset_name: str,
                                  path: str | os.PathLike) -> ArchitectureWeights:
    """The weights of any checkpoint, official or dinodet, keeping the file's class count.

    dinodet files carry their own architecture and give the weights they were evaluated with (a
    run's checkpoint.pt: its EMA weights, as predict and eval).  Official files are read into the
    architecture ``model_cfg`` describes (named ``preset_name``), whatever args they carry, with the
    file's class count and label book: e.g. an official DINO-4scale COCO model fine-tunes any
    dataset with ``--preset dino_r50_4scale``.  Every official key must be accounted for
    (``official_weights``); the caller checks that the weights fit its own model.
    """
    path = Path(path)
    obj = None if path.suffix.lower() == ".safetensors" else read_torch_file(path)
    state = official_state(obj)
    if state is None:
        ckpt = _load_checkpoint(path, obj, None, "cpu", ema=True)
        return ArchitectureWeights(ckpt.model.state_dict(), ckpt.config.model.num_classes, ckpt.class_names,
                                   ckpt.category_ids)
    levels = len(model_cfg.backbone.return_layers)
    head, book = (official_names(k, model_cfg.dec_layers, levels)[-1]
                  for k in ("class_head.bias", "denoising.label_embed.weight"))
    try:
        mcfg = replace(model_cfg, num_classes=int(state[head].shape[0]),
                                   dn_labelbook_size=int(state[book].shape[0]) - 1)
    except KeyError as e:
        raise CheckpointError(f"{path}: official checkpoint without {e}; not a DINO model?") from None
    check_finite(state, path)
    cfg = DINOConfig(name=preset_name, model=mcfg)
    try:
        check_config(cfg)  # the class count and label book come from the file's tensors
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return ArchitectureWeights(official_weights(_skeleton(cfg, path), state, path), mcfg.num_classes)


def _load_official(obj: dict[str, Any], path: Path, preset: str | None) -> LoadedCheckpoint:
    if preset is not None:
        cfg = get_preset(preset)
    else:
        args = _namespace_to_dict(obj.get("args"))
        if args is None:
            raise CheckpointError(f"{path}: official checkpoint without stored args; pass --preset")
        try:
            cfg = config_from_official_args(args)
        except (ValueError, TypeError, OverflowError) as e:  # ConfigError, or a value int()/float() cannot take
            raise CheckpointError(f"{path}: {e}") from None
    check_finite(obj["model"], path)
    state = official_weights(_skeleton(cfg, path), obj["model"], path)  # shapes first, allocation after
    model = build_model(cfg)
    model.load_state_dict(state)
    return LoadedCheckpoint(model=model, config=cfg, source="official")


def stored_config(obj: dict[str, Any], path: str | os.PathLike) -> DINOConfig:
    """The config a dinodet checkpoint was made with (``obj``: the file's content, e.g. a run's
    checkpoint.pt as ``read_train_state`` gives it), checked like any config read from data."""
    try:
        return DINOConfig.from_json(obj["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid stored config ({e})") from None


def _load_dinodet(obj: dict[str, Any], path: Path) -> LoadedCheckpoint:
    cfg = stored_config(obj, path)
    state = obj.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: dinodet checkpoint without a 'model' state dict of tensors")
    for key in ("class_names", "category_ids"):
        value = obj.get(key)
        if value is not None and not isinstance(value, list):
            raise CheckpointError(f"{path}: '{key}' must be a list, not {type(value).__name__}")
    check_finite(state, path)
    _check_fits(_skeleton(cfg, path).state_dict(), state, path, hint="its stored config does not describe its weights")
    model = build_model(cfg)
    model.load_state_dict(state)
    extra = {k: v for k, v in obj.items() if k not in ("format", "config", "model", "class_names", "category_ids")}
    return LoadedCheckpoint(model, cfg, obj.get("class_names"), obj.get("category_ids"), "dinodet", extra)


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    check_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without dinodet metadata")
    try:
        names, ids = json.loads(meta.get("class_names", "null")), json.loads(meta.get("category_ids", "null"))
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid class metadata ({e})") from None
    obj = {"format": FORMAT_TAG, "config": meta["config"], "model": state, "class_names": names, "category_ids": ids}
    return _load_dinodet(obj, path)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: DINOConfig,
                    class_names: list[str] | None = None, category_ids: list[int] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a dinodet checkpoint atomically.

    ``.safetensors`` paths get weights + JSON metadata only; other paths a weights-only torch file
    that may also carry ``extra`` plain data (optimizer state, epoch, RNG states ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        if extra:
            raise ValueError("safetensors checkpoints hold weights only; use a .pt path for training state")
        meta = {"format": FORMAT_TAG, "config": config.to_json(), "class_names": json.dumps(class_names),
                "category_ids": json.dumps(category_ids)}
        write_atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))
    else:
        obj = {"format": FORMAT_TAG, "config": config.to_json(), "model": state,
               "class_names": class_names, "category_ids": category_ids, **(extra or {})}
        write_atomic(path, lambda tmp: _torch_save(obj, tmp))
    return path


_LOW_SPACE = 1 << 20  # bytes free after a failed write that mean the disk is full


def _torch_save(obj: Any, tmp: Path) -> None:
    """torch.save, with a failed write as the OSError every other writer gives (the CLI's one line
    "No space left on device: 'PATH'"): torch reports it as a RuntimeError of its zip writer
    ("PytorchStreamWriter failed writing file data/0: file write failed"), without the errno."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:
        if "PytorchStreamWriter" not in str(e) and "inline_container" not in str(e):
            raise
        if shutil.disk_usage(tmp.parent).free < _LOW_SPACE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
        raise OSError(errno.EIO, f"writing the checkpoint failed ({first_line(e)})", str(tmp)) from None
