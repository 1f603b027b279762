"""Sine positional encodings: 2-d for feature maps, 4-d for anchor boxes."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionEncoding(nn.Module):
    """Normalised 2-d sine/cosine encoding of pixel positions inside the unpadded image.

    Separate temperatures for y and x (DINO uses 20 for both, not the usual 10000).
    Output channels: ``num_feats`` for y followed by ``num_feats`` for x.
    """

    def __init__(self, num_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0):
        super().__init__()
        self.num_feats = num_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B, H, W] bool (True = padding) -> pos [B, H, W, 2*num_feats] float32, channels last.

        Channels last because the model consumes the encoding as tokens ([B, H*W, C]); a
        channels-first result would be transposed twice on the way.
        """
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * self.scale
        x = x / (x[:, :, -1:] + eps) * self.scale
        pos_x = _sin_even_cos_odd(x[..., None] / _frequencies(self.num_feats, self.temperature_w, mask.device))
        pos_y = _sin_even_cos_odd(y[..., None] / _frequencies(self.num_feats, self.temperature_h, mask.device))
        return torch.cat((pos_y, pos_x), dim=3)


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    """[num_feats] divisors temperature ** (2 * (i // 2) / num_feats): channel pairs share one frequency."""
    dim = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim, 2, rounding_mode="floor") / num_feats)


def _sin_even_cos_odd(p: Tensor) -> Tensor:
    """[..., F] -> [..., F]: sin of the even channels, cos of the odd ones (F even).

    The same values as interleaving ``sin(p[..., 0::2])`` and ``cos(p[..., 1::2])`` by a stack,
    without the strided slices and the stack, which exported graphs (OpenVINO) run as slow
    reference kernels; computing both functions everywhere costs less than those copies.
    """
    even = torch.arange(p.shape[-1], device=p.device) % 2 == 0
    return torch.where(even, p.sin(), p.cos())


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of anchor boxes used to build decoder query positions.

    boxes [..., 4] (cx, cy, w, h) in 0..1 -> [..., 4*num_feats] ordered (y, x, w, h).
    """
    scale = 2 * math.pi
    dim = _frequencies(num_feats, temperature, boxes.device)

    def embed(coord: Tensor) -> Tensor:
        return _sin_even_cos_odd((coord * scale)[..., None] / dim)

    x, y, w, h = boxes.unbind(-1)
    return torch.cat((embed(y), embed(x), embed(w), embed(h)), dim=-1)
