"""Prediction heads: the shared class head and the box-refinement MLP."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., input_dim] -> [..., output_dim] (any leading dims, e.g. [B, Q, C])."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def class_head(hidden_dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear class head whose bias starts at the focal-loss prior (sigmoid = prior_prob)."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def box_head(hidden_dim: int) -> MLP:
    """3-layer MLP predicting a (cx, cy, w, h) delta in logit space; starts at zero (no refinement)."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head
