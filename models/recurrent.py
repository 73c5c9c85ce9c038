"""Recurrent classifiers for hourly ICU time series that Opacus can train.

The recurrent layer is Opacus's ``DPLSTM`` / ``DPGRU``: per-step ``nn.Linear`` cells whose
per-sample gradients Opacus can compute (``nn.LSTM``'s fused kernel has none). They are slower
than ``nn.LSTM`` (a Python loop over hours), so hidden sizes stay small.

Input: ``series`` (B, hours, 3V) = values carried forward, observed masks and time since the
last observation (the task builds it), and ``static`` (B, S) descriptors. The last hidden
state and a mean over hours are fused with an embedding of the static descriptors before the
head. No BatchNorm, no in-place ops.
"""

from __future__ import annotations

import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from models.registry import register_model

CELLS = {"lstm": DPLSTM, "gru": DPGRU}


class VitalsRNN(nn.Module):
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
        self.rnn = CELLS[cell](
            input_size=3 * num_variables, hidden_size=hidden_size, num_layers=num_layers,
            batch_first=True, dropout=dropout if num_layers > 1 else 0.0,
        )
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
        outputs, _ = self.rnn(series)
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
