"""Small pieces several model families share (each family keeps its own file)."""

from __future__ import annotations

import torch
from torch import nn

# Activations a model may be configured with. tanh is bounded, which keeps per-sample
# gradients small under DP-SGD (Papernot et al. 2021, tempered sigmoids). Never in place: an
# in-place op after a tracked layer breaks Opacus's backward hooks.
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name


def activation_layer(name: str) -> nn.Module:
    return ACTIVATIONS[check_activation(name)]()


def note_token_ids(tokens: torch.Tensor, max_len: int) -> torch.Tensor:
    """The notes task's ids as ``B×L×2`` (hashed word id, id of the bigram it starts; a
    ``B×L`` input of word ids only gains the channel), at most ``max_len`` positions."""
    if tokens.dim() == 2:  # word ids only, no bigram channel
        tokens = tokens.unsqueeze(-1)
    if tokens.shape[1] > max_len:
        raise ValueError(f"notes of {tokens.shape[1]} positions are longer than max_len "
                         f"{max_len} (task.spec.max_len)")
    return tokens
