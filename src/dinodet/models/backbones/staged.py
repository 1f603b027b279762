"""What the Swin and ConvNeXt backbones share: checked ``return_layers`` / ``frozen_stages``, frozen
parts kept in eval mode, and the (features, mask) pairs of the backbone interface."""
from __future__ import annotations

from torch import Tensor, nn

from ..masks import resample_mask


class StagedBackbone(nn.Module):
    """A four-stage ImageNet trunk (``self.body``) behind the backbone interface.

    Subclasses call ``_setup`` in ``__init__`` and define ``stem`` (the patch embedding / stem),
    ``stages`` (the stage modules, in order), ``features(images)`` (the returned stages' maps) and
    ``set_checkpointing``.  ``frozen_stages``: -1 trains everything (official DINO); 0 freezes the
    stem; k >= 1 also freezes stages 0..k-1.  Frozen parts get no gradient and stay in eval mode.
    """

    return_layers: tuple[int, ...]
    frozen_stages: int

    def _setup(self, return_layers: tuple[int, ...], num_stages: int, frozen_stages: int) -> None:
        """Check and keep the two stage selections (before the trunk is built)."""
        self.return_layers = tuple(sorted(return_layers))
        if not self.return_layers or not set(self.return_layers) <= set(range(num_stages)):
            raise ValueError(f"return_layers {return_layers} must be stage indices in 0..{num_stages - 1}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        self.frozen_stages = frozen_stages

    @property
    def stem(self) -> nn.Module:
        raise NotImplementedError

    @property
    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def features(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def set_checkpointing(self, enabled: bool = True) -> None:
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[:self.frozen_stages]]

    def train(self, mode: bool = True) -> StagedBackbone:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images [B, 3, H, W], mask [B, H, W] -> per returned stage (features [B, C_i, h_i, w_i], mask [B, h_i, w_i])."""
        return [(f, resample_mask(mask, f.shape[-2:])) for f in self.features(images)]
