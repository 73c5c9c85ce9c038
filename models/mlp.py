"""A multilayer perceptron for encoded tabular records; ``hidden: []`` is logistic regression.

Opacus-ready: only ``nn.Linear`` carries parameters, activations are not in place (an in-place
op after a tracked layer breaks Opacus's backward hooks), no BatchNorm (it mixes examples, which
per-sample clipping forbids). ``activation: tanh`` bounds the hidden units, which keeps
per-sample gradients small under DP-SGD (Papernot et al. 2021, tempered sigmoids).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.layers import activation_layer, check_activation
from models.registry import register_model


class TabularMLP(nn.Module):
    """``Linear -> activation -> Dropout`` per entry of ``hidden``, then a linear head to logits."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if num_features < 1 or num_classes < 2:
            raise ValueError(f"need num_features >= 1 and num_classes >= 2, got "
                             f"{num_features} and {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_activation(activation)
        layers: list[nn.Module] = []
        width = int(num_features)
        for size in hidden:
            if int(size) < 1:
                raise ValueError(f"hidden layer widths must be >= 1, got {list(hidden)}")
            layers += [nn.Linear(width, int(size)), activation_layer(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(size)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register_model("mlp")
def build_mlp(**kwargs) -> nn.Module:
    return TabularMLP(**kwargs)
