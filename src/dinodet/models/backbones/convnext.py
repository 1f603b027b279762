"""ConvNeXt backbone (ConvNeXt-T/S/B/L/XL) built from timm's implementation.

timm's ``ConvNeXt`` (patch stem, ``conv_mlp=False``) computes what DINO's ConvNeXt computes: a 4x4/4
conv stem + channels-first LayerNorm, per stage a LayerNorm + 2x2/2 conv downsampling (stages 1-3),
blocks of depthwise 7x7 conv -> LayerNorm -> Linear -> GELU -> Linear -> layer scale ``gamma`` ->
stochastic depth + residual, eps 1e-6 everywhere, per-block drop-path rates linear in depth.  Strided
convolutions floor odd sizes, as in the official code.  (timm's channels-first LayerNorm permutes and
calls ``F.layer_norm`` where the official one spells out mean/variance: equal up to float rounding.)

dinodet reuses timm's stem and stages and adds what DINO consumes on top: a channels-first LayerNorm
``norm{i}`` per stage applied to the stage output.  As in the official module there is one for every
stage (so official state dicts map one to one); those of stages that are not returned are unused and
frozen.  The classification head is dropped.  Parameter names are timm's (``stem``,
``stages.{i}.downsample``, ``stages.{i}.blocks.{j}.conv_dw`` ...); ``dinodet.compat.official_keys``
and ``dinodet.checkpoint`` translate from the original / official layout (``downsample_layers``,
``stages.{i}.{j}.dwconv`` ...).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .staged import StagedBackbone

# depths, dims
CONVNEXT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


class ConvNeXtTrunk(nn.Module):
    """timm ConvNeXt stem + stages, plus one output LayerNorm ``norm{i}`` per stage."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6):
        super().__init__()
        # imported on use: timm is only needed by Swin / ConvNeXt
        from timm.layers import LayerNorm2d
        from timm.models.convnext import ConvNeXt as TimmConvNeXt

        net = TimmConvNeXt(depths=depths, dims=dims, num_classes=0, ls_init_value=layer_scale_init,
                           drop_path_rate=drop_path_rate)
        self.stem = net.stem
        self.stages = net.stages
        self.dims = list(dims)
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", LayerNorm2d(d, eps=1e-6))
        self.use_checkpoint = False

    def forward(self, images: Tensor, out_indices: tuple[int, ...]) -> list[Tensor]:
        """images [B, 3, H, W] -> one normalised map [B, dims[i], floor(H / 2^(i+2)), floor(W / 2^(i+2))]
        per stage i in ``out_indices``, in stage order; stages after the last requested one are skipped."""
        x = self.stem(images)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage.downsample(x)
            for blk in stage.blocks:
                if self.use_checkpoint and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            if i in out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
            if i == max(out_indices):
                break
        return outs


class ConvNeXtBackbone(StagedBackbone):
    """ConvNeXt behind the backbone interface: ``forward(images, mask) -> [(features, mask), ...]``.

    ``return_layers`` count stages like the official ``return_interm_indices`` (0..3 = strides 4..32).
    ``frozen_stages`` (see ``StagedBackbone``): a stage includes its downsampling layer.
    ``use_checkpoint`` recomputes each block's activations in the backward pass.
    """

    def __init__(self, name: str = "convnext_xlarge", return_layers: tuple[int, ...] = (1, 2, 3),
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False, frozen_stages: int = -1):
        super().__init__()
        if name not in CONVNEXT_VARIANTS:
            raise ValueError(f"unknown ConvNeXt variant '{name}' (available: {', '.join(CONVNEXT_VARIANTS)})")
        depths, dims = CONVNEXT_VARIANTS[name]
        self._setup(return_layers, len(depths), frozen_stages)
        self.body = ConvNeXtTrunk(depths, dims, drop_path_rate)
        self.num_channels = [dims[i] for i in self.return_layers]
        self.strides = [2 ** (i + 2) for i in self.return_layers]
        self.set_checkpointing(use_checkpoint)
        for i in range(len(dims)):
            if i not in self.return_layers:  # present for state-dict compatibility only
                getattr(self.body, f"norm{i}").requires_grad_(False)
        for m in self.frozen_modules():
            m.requires_grad_(False)

    @property
    def stem(self) -> nn.Module:
        return self.body.stem

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.body.stages)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.body(images, self.return_layers)

    def set_checkpointing(self, enabled: bool = True) -> None:
        self.body.use_checkpoint = enabled
