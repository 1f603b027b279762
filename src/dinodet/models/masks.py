"""Padding masks ([B, H, W] bool, True on padding; images sit at the top-left): resampling to a
feature map's size and the size of the valid (image) region, shared by the backbones, the model
and the query selection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a padding mask [B, H, W] bool to ``size`` (official rule)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def valid_sizes(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask [B, H, W] -> (valid rows [B], valid columns [B]), int64: the image's extent in the map,
    read off its first column and first row (the image is top-left aligned)."""
    return torch.sum(~mask[:, :, 0], 1), torch.sum(~mask[:, 0, :], 1)


def valid_ratios(mask: Tensor) -> Tensor:
    """mask [B, H, W] -> [B, 2] (w, h) fraction of the map that is image."""
    _, h, w = mask.shape
    valid_h, valid_w = valid_sizes(mask)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
