"""``tiny_mlp``: one tanh hidden layer (conf/model/tiny_mlp.yaml).

Opacus-ready like medsilo's own models: only ``nn.Linear`` holds parameters, no BatchNorm, no
in-place activation, so ``privacy=dp`` works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from models import register_model


class TinyMLP(nn.Module):
    def __init__(self, num_features: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        if num_features < 1 or num_classes < 2 or width < 1:
            raise ValueError(f"tiny_mlp needs num_features >= 1, num_classes >= 2 and width >= 1, "
                             f"got {num_features}, {num_classes} and {width}")
        self.hidden = nn.Linear(num_features, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


# the keys of conf/model/tiny_mlp.yaml (but ``name``) and the task's spec arrive as arguments
@register_model("tiny_mlp")
def build_tiny_mlp(**kwargs) -> nn.Module:
    return TinyMLP(**kwargs)
