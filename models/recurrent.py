"""Recurrent classifiers for hourly ICU time series that Opacus can train.

The recurrent layer is ``models/dp_recurrent.py``'s ``FastRNN``: without DP it runs the kernel
behind ``nn.LSTM`` / ``nn.GRU`` (same function, same initialisation); under Opacus DP-SGD it
computes its own vectorised per-sample gradients (Opacus's ``DPLSTM`` unrolls hours in Python
and is 3-4× slower than ``nn.LSTM`` even without DP).

Input: ``series`` (B, hours, 3V) = values carried forward, observed masks and time since the
last observation (the task builds it), and ``static`` (B, S) descriptors. The last hidden
state and a mean over hours are fused with an embedding of the static descriptors before the
head. No BatchNorm, no in-place ops.
"""

from __future__ import annotations

import torch
from torch import nn

from models.dp_recurrent import CELLS, FastRNN
from models.registry import register_model


class VitalsRNN(nn.Module):
    # Per-sample gradients: Opacus hooks (Linear samplers + FastRNN's own recurrence sampler).
    grad_sample_mode = "hooks"

    def __init__(
        self,
        num_variables: int,
        num_static: int,
        num_classes: int,
        cell: str = "lstm",
        hidden_size: int = 32,
        num_layers: int = 1,
        static_size: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.num_variables = num_variables
        self.rnn = FastRNN(cell, input_size=3 * num_variables, hidden_size=hidden_size,
                           num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.static = nn.Sequential(nn.Linear(num_static, static_size), nn.ReLU()) \
            if num_static > 0 else None
        fused = 2 * hidden_size + (static_size if num_static > 0 else 0)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(fused, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, series: torch.Tensor, static: torch.Tensor | None = None) -> torch.Tensor:
        if series.shape[-1] != 3 * self.num_variables:
            raise ValueError(f"series has {series.shape[-1]} features per hour; expected "
                             f"3 x {self.num_variables} (values, masks, time since observed)")
        outputs = self.rnn(series)
        # The last hour carries the trajectory; the mean over hours keeps early information
        # that a small recurrent state forgets.
        summary = [outputs[:, -1], outputs.mean(dim=1)]
        if self.static is not None:
            summary.append(self.static(static))
        return self.head(torch.cat(summary, dim=1))


@register_model("lstm")
def build_lstm(**kwargs) -> nn.Module:
    return VitalsRNN(**{"cell": "lstm", **kwargs})


@register_model("gru")
def build_gru(**kwargs) -> nn.Module:
    return VitalsRNN(**{"cell": "gru", **kwargs})
