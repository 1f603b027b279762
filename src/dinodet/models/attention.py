"""Multi-scale deformable attention module (projections around the MSDA op)."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.constants import device_constant
from .ops.msda import ENV_VAR, REFERENCE, backend_function, get_backend, select_backend


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` learned sampling points per head and level.

    Reference points are either points (x, y) or boxes (cx, cy, w, h); for boxes the offsets are
    scaled by half the box size divided by ``n_points`` (Deformable-DETR / DINO convention).

    ``msda_backend`` is the requested MSDA backend (the config's, may be ``auto``); ``backend`` the one
    that runs, set by ``configure_msda`` where the model is put on a device.  Until then it is the
    reference, which runs on every device.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.msda_backend = backend
        self.use_backend(REFERENCE)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # initial offsets point outwards in n_heads directions, 1..n_points steps away
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def use_backend(self, name: str) -> None:
        """Run the already-resolved backend ``name`` (``configure_msda`` decides which)."""
        fn = backend_function(name)
        if fn is None:
            raise ValueError(f"MSDA backend '{name}' is not available here")
        self.backend, self._devices, self._msda = name, get_backend(name).devices, fn

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: list[tuple[int, int]], value_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: [B, Lq, C] (content + position).
            reference_points: [B, Lq, n_levels, 2] points or [B, Lq, n_levels, 4] boxes, 0..1 of the
                padded map (i.e. already multiplied by the valid ratios).
            value: [B, S, C] flattened multi-level features.
            spatial_shapes: n_levels pairs (H_l, W_l).
            value_padding_mask: [B, S] True on padded tokens (their values are zeroed).
        Returns:
            [B, Lq, C].
        """
        b, lq, _ = query.shape
        s = value.shape[1]
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2)
        weights = F.softmax(self.attention_weights(query).view(b, lq, m, n_l * n_p), -1).view(b, lq, m, n_l, n_p)
        if reference_points.shape[-1] == 2:
            normalizer = device_constant(tuple((w, h) for h, w in spatial_shapes), query.dtype, query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / n_p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {reference_points.shape[-1]}")
        if self._devices is not None and v.device.type not in self._devices:
            raise RuntimeError(f"MSDA backend '{self.backend}' runs on {'/'.join(self._devices)}, not on "
                               f"{v.device.type}: call configure_msda(model, device) after moving the model")
        return self.output_proj(self._msda(v, spatial_shapes, locations, weights))


def configure_msda(model: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   override: str | None = None, needs_grad: bool = False) -> str:
    """Resolve the MSDA backend of every deformable attention of ``model`` for running on ``device`` with
    ``dtype`` compute (the autocast dtype under autocast), with gradients or not, and return its name.

    Called once where a model is put on a device (inference modes, training, export, bench).  The
    request, strongest first: ``override`` (a mode or an export that needs one backend), ``$DINODET_MSDA``
    (read here, not per call), each module's ``msda_backend`` (the config's ``model.msda_backend``).
    ``ops.msda.select_backend`` turns it into a backend that runs there.  Names are joined by ``,`` if
    modules were requested differently; "" for a model without deformable attention.

    Raises:
        ValueError: an unknown backend name.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    resolved: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            requested = override or env or module.msda_backend
            if requested not in resolved:
                resolved[requested] = select_backend(requested, device, dtype, needs_grad)
            module.use_backend(resolved[requested])
    return ",".join(sorted(set(resolved.values())))
