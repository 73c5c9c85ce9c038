"""A small CNN for 2D scans that Opacus can train.

GroupNorm instead of BatchNorm (BatchNorm mixes examples, which per-sample clipping forbids),
and no in-place activations (they break Opacus's backward hooks). Per-sample gradients:
Opacus hooks (``grad_sample_mode``), measured faster than ghost clipping here (Opacus has no
conv norm sampler, so ghost runs a second backward pass). The norms carry no parameters of
their own, and the convs' per-sample gradients are one grouped weight-gradient convolution
(``models/dp_conv.py``, not Opacus's unfold): a DP step is about 1.2-1.4× a non-private one at
batch 64 (CPU time, interleaved; simulations/benchmarks/training.py), 1.4-2.3× with Opacus's.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import Conv2d, activation_layer, check_activation
from models.registry import register_model


def _block(c_in: int, c_out: int, groups: int, activation: str = "relu") -> nn.Sequential:
    # The norm has no affine parameters: under DP-SGD each parameter tensor costs a
    # per-sample gradient (GroupNorm's recomputes the normalisation) and its own clipping and
    # noise; the conv bias before it still gives each channel its own offset within its group.
    return nn.Sequential(
        Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(min(groups, c_out), c_out, affine=False),
        activation_layer(activation),
        nn.MaxPool2d(2),
    )


class ScanCNN(nn.Module):
    """``depth`` conv blocks (channels doubling from ``width``), global pooling, linear head.

    Works for any image size ≥ 2**depth (28×28 and 64×64 in practice).
    """

    grad_sample_mode = "hooks"  # how DP-SGD gets per-sample gradients (client/training.py)

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int,
        width: int = 16,
        depth: int = 2,
        groups: int = 4,
        dropout: float = 0.0,
        pool: str = "max",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_activation(activation)
        if image_size < 2**depth:
            raise ValueError(f"image_size {image_size} is too small for depth {depth}")
        blocks, c_in = [], channels
        for i in range(depth):
            c_out = width * 2**i
            blocks.append(_block(c_in, c_out, groups, activation))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        # max: "is there a finding anywhere" (a small lesion survives); avg: diffuse patterns
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        # Normalising the pooled features keeps the logits' common offset from swinging
        # with every step (the ranking was learned long before accuracy settled without it).
        # No affine parameters: the linear head absorbs any scale and shift.
        self.norm = nn.LayerNorm(c_in, elementwise_affine=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-scan standardisation: removes scanner gain/offset differences between hospitals.
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-5)
        x = self.norm(self.pool(self.features(x)).flatten(1))
        return self.head(self.dropout(x))


@register_model("cnn")
def build_cnn(**kwargs) -> nn.Module:
    return ScanCNN(**kwargs)
