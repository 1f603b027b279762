"""Exponential moving average of model weights (the official DINO ``ModelEma``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point
entry of the state dict (parameters AND buffers, as officially); integer buffers are copied.
Evaluation then uses ``ema.module``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """EMA shadow of a model: ``module`` is a deep copy in eval mode without gradients.

    Call ``update(model)`` after every optimizer step; ``updates`` counts them.  ``state_dict`` holds
    decay, updates and the averaged weights (on CPU) for checkpoints.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        # a full copy (not just tensors) so the EMA weights can be evaluated like any model
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s current weights into the average (``model`` unwrapped, not DDP)."""
        current = model.state_dict()
        avgs, values = [], []
        for name, avg in self.module.state_dict().items():
            if avg.dtype.is_floating_point:
                avgs.append(avg)
                values.append(current[name].detach())
            else:
                avg.copy_(current[name])
        if avgs:
            # decay * e + (1 - decay) * m, in the official operation order, as a few multi-tensor
            # kernels instead of three small ones per tensor
            blended = torch._foreach_mul(avgs, self.decay)
            torch._foreach_add_(blended, torch._foreach_mul(values, 1.0 - self.decay))
            torch._foreach_copy_(avgs, blended)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])
