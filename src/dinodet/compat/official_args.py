"""Translate the argparse namespace stored in official DINO checkpoints into a DINOConfig."""
from __future__ import annotations

from typing import Any

from ..config import BackboneConfig, ConfigError, DINOConfig, LossConfig, ModelConfig, check_config

_RESNETS = ("resnet50", "resnet101")
# official backbone name -> (dinodet name, window size); the official build never sets a drop-path rate,
# so Swin keeps its constructor default 0.2 and ConvNeXt 0.0
_SWINS = {
    "swin_T_224_1k": ("swin_t", 7),
    "swin_B_224_22k": ("swin_b", 7),
    "swin_B_384_22k": ("swin_b", 12),
    "swin_L_224_22k": ("swin_l", 7),
    "swin_L_384_22k": ("swin_l", 12),
}
_CONVNEXTS = {"convnext_xlarge_22k": "convnext_xlarge"}


def _backbone_config(args: dict[str, Any]) -> BackboneConfig:
    backbone = args.get("backbone", "resnet50")
    levels = tuple(args.get("return_interm_indices", [1, 2, 3]))
    dilation = bool(args.get("dilation", False))
    if backbone in _RESNETS:
        return BackboneConfig(name=backbone, return_layers=levels, dilation=dilation)
    _require(args, "backbone_freeze_keywords", (None, []))
    if backbone in _SWINS:
        name, window = _SWINS[backbone]
        return BackboneConfig(name=name, return_layers=levels, dilation=dilation, window_size=window,
                              drop_path_rate=0.2, use_checkpoint=bool(args.get("use_checkpoint", False)))
    if backbone in _CONVNEXTS:
        # the official ConvNeXt build ignores dilation and use_checkpoint
        return BackboneConfig(name=_CONVNEXTS[backbone], return_layers=levels, drop_path_rate=0.0)
    supported = ", ".join([*_RESNETS, *_SWINS, *_CONVNEXTS])
    raise ConfigError(f"official backbone '{backbone}' is not supported (supported: {supported})")


def _require(args: dict[str, Any], key: str, allowed) -> None:
    if key in args and args[key] not in allowed:
        raise ConfigError(f"official config uses {key}={args[key]!r}, which dinodet does not implement")


def _labelbook(args: dict[str, Any]) -> int | None:
    """None when the label book matches the class count (dinodet's default), else the stored size."""
    size = int(args.get("dn_labelbook_size", args.get("num_classes", 91)))
    return None if size == int(args.get("num_classes", 91)) else size


def config_from_official_args(args: dict[str, Any]) -> DINOConfig:
    """Build the equivalent dinodet config from an official ``args`` dict (DINO_*scale*.py)."""
    _require(args, "modelname", ("dino",))
    _require(args, "two_stage_type", ("standard",))
    _require(args, "decoder_sa_type", ("sa",))
    _require(args, "dec_pred_class_embed_share", (True,))
    _require(args, "dec_pred_bbox_embed_share", (True,))
    _require(args, "two_stage_class_embed_share", (False,))
    _require(args, "two_stage_bbox_embed_share", (False,))
    _require(args, "transformer_activation", ("relu",))
    _require(args, "masks", (False,))
    _require(args, "num_patterns", (0,))
    _require(args, "dec_layer_number", (None,))
    backbone = args.get("backbone", "resnet50")
    model = ModelConfig(
        backbone=_backbone_config(args),
        num_classes=int(args.get("num_classes", 91)),
        hidden_dim=int(args.get("hidden_dim", 256)),
        num_heads=int(args.get("nheads", 8)),
        num_feature_levels=int(args.get("num_feature_levels", 4)),
        enc_layers=int(args.get("enc_layers", 6)),
        dec_layers=int(args.get("dec_layers", 6)),
        dim_feedforward=int(args.get("dim_feedforward", 2048)),
        dropout=float(args.get("dropout", 0.0)),
        enc_n_points=int(args.get("enc_n_points", 4)),
        dec_n_points=int(args.get("dec_n_points", 4)),
        num_queries=int(args.get("num_queries", 900)),
        pe_temperature_h=float(args.get("pe_temperatureH", 20)),
        pe_temperature_w=float(args.get("pe_temperatureW", 20)),
        proposal_base_size=float(args.get("two_stage_default_hw", 0.05)),
        dn_number=int(args.get("dn_number", 100)) if args.get("use_dn", True) else 0,
        dn_box_noise_scale=float(args.get("dn_box_noise_scale", 0.4)),
        dn_label_noise_ratio=float(args.get("dn_label_noise_ratio", 0.5)),
        dn_labelbook_size=_labelbook(args),
        num_select=int(args.get("num_select", 300)),
    )
    loss = LossConfig(
        cost_class=float(args.get("set_cost_class", 2.0)),
        cost_bbox=float(args.get("set_cost_bbox", 5.0)),
        cost_giou=float(args.get("set_cost_giou", 2.0)),
        cls_loss_coef=float(args.get("cls_loss_coef", 1.0)),
        bbox_loss_coef=float(args.get("bbox_loss_coef", 5.0)),
        giou_loss_coef=float(args.get("giou_loss_coef", 2.0)),
        interm_loss_coef=float(args.get("interm_loss_coef", 1.0)),
        focal_alpha=float(args.get("focal_alpha", 0.25)),
    )
    name = f"official_{backbone}_{model.num_feature_levels}scale"
    return check_config(DINOConfig(name=name, model=model, loss=loss))
