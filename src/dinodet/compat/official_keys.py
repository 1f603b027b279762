"""Mapping between dinodet parameter names and the official IDEA-Research DINO state-dict keys.

The official model stores the shared class/box heads once per decoder layer and once more under
``transformer.decoder`` (all aliases of one tensor); dinodet stores each head once.  This module is
the only place that knows the official names.

Backbones: the ResNet trunk is ``backbone.0.body.*`` officially; Swin and ConvNeXt (and their
per-stage output norms ``norm{i}``) sit directly under ``backbone.0.*`` with the names of their
original ImageNet releases.  dinodet's ConvNeXt uses timm's names, translated here.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from torch import Tensor

# (dinodet regex, official template(s)); templates use \1.. groups of the dinodet regex.
# Per-layer head aliases are expanded separately (they depend on the number of decoder layers).
_RULES: list[tuple[str, str]] = [
    # ResNet: the torchvision trunk sits under backbone.0.body
    (r"^backbone\.body\.((?:conv1|bn1|layer[1-4])\..+)$", r"backbone.0.body.\1"),
    # Swin (same names as the original Swin release) and the per-stage output norms of Swin / ConvNeXt
    (r"^backbone\.body\.((?:patch_embed|layers|norm\d+)\..+)$", r"backbone.0.\1"),
    # ConvNeXt: timm layout (dinodet) -> original / official layout
    (r"^backbone\.body\.stem\.(\d+)\.(.+)$", r"backbone.0.downsample_layers.0.\1.\2"),
    (r"^backbone\.body\.stages\.(\d+)\.downsample\.(\d+)\.(.+)$", r"backbone.0.downsample_layers.\1.\2.\3"),
    (r"^backbone\.body\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(.+)$", r"backbone.0.stages.\1.\2.dwconv.\3"),
    (r"^backbone\.body\.stages\.(\d+)\.blocks\.(\d+)\.norm\.(.+)$", r"backbone.0.stages.\1.\2.norm.\3"),
    (r"^backbone\.body\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(.+)$", r"backbone.0.stages.\1.\2.pwconv1.\3"),
    (r"^backbone\.body\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(.+)$", r"backbone.0.stages.\1.\2.pwconv2.\3"),
    (r"^backbone\.body\.stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"backbone.0.stages.\1.\2.gamma"),
    (r"^level_embed$", r"transformer.level_embed"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(.+)$", r"transformer.encoder.layers.\1.self_attn.\2"),
    (r"^encoder\.layers\.(\d+)\.norm\.(.+)$", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"^encoder\.layers\.(\d+)\.ffn\.(linear[12])\.(.+)$", r"transformer.encoder.layers.\1.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.ffn\.norm\.(.+)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn\.(.+)$", r"transformer.decoder.layers.\1.self_attn.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn_norm\.(.+)$", r"transformer.decoder.layers.\1.norm2.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.(.+)$", r"transformer.decoder.layers.\1.cross_attn.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn_norm\.(.+)$", r"transformer.decoder.layers.\1.norm1.\2"),
    (r"^decoder\.layers\.(\d+)\.ffn\.(linear[12])\.(.+)$", r"transformer.decoder.layers.\1.\2.\3"),
    (r"^decoder\.layers\.(\d+)\.ffn\.norm\.(.+)$", r"transformer.decoder.layers.\1.norm3.\2"),
    (r"^decoder\.norm\.(.+)$", r"transformer.decoder.norm.\1"),
    (r"^decoder\.query_pos_head\.(.+)$", r"transformer.decoder.ref_point_head.\1"),
    (r"^query_selection\.memory_proj\.(.+)$", r"transformer.enc_output.\1"),
    (r"^query_selection\.memory_norm\.(.+)$", r"transformer.enc_output_norm.\1"),
    (r"^query_selection\.class_head\.(.+)$", r"transformer.enc_out_class_embed.\1"),
    (r"^query_selection\.box_head\.(.+)$", r"transformer.enc_out_bbox_embed.\1"),
    (r"^query_selection\.content_queries\.(.+)$", r"transformer.tgt_embed.\1"),
    (r"^denoising\.label_embed\.(.+)$", r"label_enc.\1"),
]
_HEADS = {"class_head": "class_embed", "box_head": "bbox_embed"}


def official_names(key: str, num_dec_layers: int, num_backbone_levels: int) -> list[str]:
    """All official keys that hold dinodet parameter ``key`` (several for the shared heads)."""
    m = re.match(r"^(class_head|box_head)\.(.+)$", key)
    if m:
        name, rest = _HEADS[m.group(1)], m.group(2)
        return ([f"{name}.{i}.{rest}" for i in range(num_dec_layers)]
                + [f"transformer.decoder.{name}.{i}.{rest}" for i in range(num_dec_layers)])
    m = re.match(r"^input_proj\.lateral\.(\d+)\.(.+)$", key)
    if m:
        return [f"input_proj.{m.group(1)}.{m.group(2)}"]
    m = re.match(r"^input_proj\.extra\.(\d+)\.(.+)$", key)
    if m:
        return [f"input_proj.{num_backbone_levels + int(m.group(1))}.{m.group(2)}"]
    for pattern, template in _RULES:
        if re.match(pattern, key):
            return [re.sub(pattern, template, key)]
    raise KeyError(f"no official name for dinodet parameter '{key}'")


def original_backbone_name(body_key: str) -> str:
    """Name of backbone parameter ``body_key`` (relative to ``backbone.body``) in the original ImageNet
    release of that network: torchvision ResNet, Swin (microsoft/Swin-Transformer) or ConvNeXt
    (facebookresearch/ConvNeXt).  These are the official DINO names without ``backbone.0.[body.]``."""
    (official,) = official_names(f"backbone.body.{body_key}", 0, 0)
    return re.sub(r"^backbone\.0\.(?:body\.)?", "", official)


def official_key_map(dinodet_keys: list[str], num_dec_layers: int, num_backbone_levels: int) -> OrderedDict[str, str]:
    """official key -> dinodet key for every official entry a checkpoint of this model has."""
    out: OrderedDict[str, str] = OrderedDict()
    for k in dinodet_keys:
        for off in official_names(k, num_dec_layers, num_backbone_levels):
            out[off] = k
    return out


def to_official(state: dict[str, Tensor], num_dec_layers: int, num_backbone_levels: int) -> OrderedDict[str, Tensor]:
    """dinodet state dict -> official-format state dict (shared heads repeated under every alias)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in state.items():
        for off in official_names(k, num_dec_layers, num_backbone_levels):
            out[off] = v
    return out


def is_official_state(state: dict[str, Any]) -> bool:
    """Whether a state dict has the official layout (its transformer sits under ``transformer.``)."""
    return any(k.startswith("transformer.") for k in state)


def official_state(obj: Any) -> dict[str, Tensor] | None:
    """The state dict of an official DINO file's contents (``torch.load`` of a model-zoo checkpoint:
    ``{"model": state, "args": ...}`` or the bare state dict), or None for anything else."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and is_official_state(obj["model"]):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()) and is_official_state(obj):
        return obj
    return None
