"""ResNet backbone (frozen BatchNorm as the official recipe, or trainable norms for training from scratch)
returning multi-scale features and padding masks."""
from __future__ import annotations

from functools import partial

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from ..masks import resample_mask

_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's frozen BatchNorm (same buffers, same float operations) with its per-channel
    scale and shift kept between calls: the statistics are constants, and recomputing the affine
    costs 5 small kernels per layer, about 265 launches per ResNet-50 forward on a GPU.

    The cache is rebuilt when a buffer changes in place (``load_state_dict``) or moves (``.to``);
    compiled and exported graphs compute the affine inline (Inductor folds it anyway).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self._affine: tuple[tuple, Tensor, Tensor] | None = None

    def _apply(self, fn, recurse=True):
        self._affine = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(x)
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if any(t.is_inference() for t in buffers):  # made under inference_mode: no version counter
            return super().forward(x)
        key = tuple((t.device, t.data_ptr(), t._version) for t in buffers)
        if self._affine is None or self._affine[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                w, b, rm, rv = (t.reshape(1, -1, 1, 1) for t in buffers)
                scale = w * (rv + self.eps).rsqrt()  # torchvision's expression, so the same values
                self._affine = (key, scale, b - rm * scale)
        _, scale, shift = self._affine
        return x * scale + shift


# frozen_bn: official (ImageNet statistics kept fixed).  A randomly initialised network needs real
# normalisation to train: gn (GroupNorm, 32 groups) does not depend on the batch, so results stay
# independent of batch size and of the number of DDP processes; bn is plain BatchNorm.
NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": partial(nn.GroupNorm, 32)}


class ResNetBackbone(nn.Module):
    """torchvision ResNet (weights=None) with ``norm`` layers (see ``NORMS``; official: frozen_bn).

    ``return_layers`` picks stages as the official ``return_interm_indices``: 0..3 = layer1..layer4
    (strides 4, 8, 16, 32).  Stages before ``freeze_at`` and the stem get no gradient; ``freeze_at=-1``
    trains everything, the stem included (for training from scratch).
    """

    def __init__(self, name: str = "resnet50", return_layers: tuple[int, ...] = (1, 2, 3),
                 dilation: bool = False, freeze_at: int = 1, norm: str = "frozen_bn"):
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"unknown ResNet '{name}' (available: {', '.join(_CHANNELS)})")
        if norm not in NORMS:
            raise ValueError(f"unknown ResNet norm '{norm}' (available: {', '.join(NORMS)})")
        kwargs = {"weights": None, "norm_layer": NORMS[norm]}
        if name in ("resnet50", "resnet101"):
            kwargs["replace_stride_with_dilation"] = [False, False, dilation]
        body = getattr(torchvision.models, name)(**kwargs)
        del body.fc, body.avgpool
        self.body = body
        self.return_layers = tuple(sorted(return_layers))
        self.num_channels = [_CHANNELS[name][i] for i in self.return_layers]
        self.strides = [2 ** (i + 2) for i in self.return_layers]
        frozen = [] if freeze_at < 0 else ["conv1", "bn1"] + list(_STAGES[:freeze_at])
        for pname, p in self.body.named_parameters():
            if pname.split(".")[0] in frozen:
                p.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images [B, 3, H, W], mask [B, H, W] -> per returned stage (features [B, C_i, h_i, w_i], mask [B, h_i, w_i])."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        outs = []
        for i, stage in enumerate(_STAGES):
            x = getattr(b, stage)(x)
            if i in self.return_layers:
                outs.append((x, resample_mask(mask, x.shape[-2:])))
            if i >= max(self.return_layers):
                break
        return outs
