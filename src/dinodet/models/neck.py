"""Input projection: backbone stages -> hidden_dim maps, plus extra strided-conv levels."""
from __future__ import annotations

from torch import Tensor, nn


class InputProjection(nn.Module):
    """1x1 conv + GroupNorm per backbone stage; each extra level is a 3x3 stride-2 conv + GroupNorm
    applied to the previous one (the first extra level reads the last backbone stage directly)."""

    def __init__(self, in_channels: list[int], hidden_dim: int, num_levels: int):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_feature_levels {num_levels} < number of backbone outputs {len(in_channels)}")
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels
        )
        extra = []
        c = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            extra.append(nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=3, stride=2, padding=1),
                                       nn.GroupNorm(32, hidden_dim)))
            c = hidden_dim
        self.extra = nn.ModuleList(extra)
        for proj in list(self.lateral) + list(self.extra):
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: backbone maps [B, C_i, H_i, W_i] -> num_levels maps [B, hidden_dim, h, w]."""
        outs = [proj(f) for proj, f in zip(self.lateral, features)]
        prev = features[-1]
        for proj in self.extra:
            prev = proj(prev)
            outs.append(prev)
        return outs
