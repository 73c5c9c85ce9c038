"""LSTM and GRU layers: ``nn.LSTM``'s fused kernel when training is not private, their own
vectorised per-sample gradients under Opacus DP-SGD.

Opacus's ``DPLSTM`` / ``DPGRU`` unroll the recurrence in Python with one ``nn.Linear`` call per
hour so that its generic Linear hooks see every step: 3-4× slower than ``nn.LSTM`` even without
DP. Here one layer is

- ``input_projection``: an ``nn.Linear`` from the hour's features to the gate pre-activations
  (W_ih, b_ih), applied to all hours at once; its per-sample gradient is Opacus's own Linear
  sampler, because the gradient reaching its output is exactly dL/d(gates) at every hour;
- ``recurrence``: W_hh, b_hh. Its forward runs ``torch.lstm`` / ``torch.gru`` (the kernel behind
  ``nn.LSTM`` / ``nn.GRU``) on the projected gates with an identity input weight, so autograd's
  backward through time is torch's own, and the gradient at the kernel's input is dL/d(gates).
  A tap records that gradient; the per-sample gradients of W_hh and b_hh are then one einsum
  each: ∂L_b/∂W_hh = Σ_t dgates[b, t]ᵀ h[b, t-1] (for the GRU the candidate gate's hidden part
  is scaled by the reset gate r, recomputed from the stored states).

Which path runs: the fused one (all four weights in one ``torch.lstm`` call, exactly what
``nn.LSTM`` computes) unless the ``recurrence`` module carries forward hooks while training
with gradients on, which is how Opacus's hooks-mode ``GradSampleModule`` observes a layer. Both
paths compute the same function of the same parameters (same state_dict), so the global model
does not depend on which sites trained privately. One forward per backward (what a training
step does): the recorded tensors belong to the last forward.

Cost (simulations/benchmarks/training.py, vitals defaults, 1 thread): the identity input weight
makes the kernel 128 wide instead of 48, about +2 ms per step of 32 stays × 48 hours; with
Opacus's per-parameter clipping and noise a DP epoch is about 2.5-2.7× the fused ``nn.LSTM``
epoch, against about 10× for Opacus's ``DPLSTM``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

CELLS = {"lstm": 4, "gru": 3}  # gate blocks per cell, in torch's order (i f g o / r z n)


class _GradientTap(torch.autograd.Function):
    """Identity; on the way back it records the incoming gradient on ``owner.<slot>``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, owner: nn.Module, slot: str) -> torch.Tensor:
        ctx.owner, ctx.slot = owner, slot
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        setattr(ctx.owner, ctx.slot, grad.detach())
        return grad, None, None


def _run_kernel(cell: str, x: torch.Tensor, weights: list[torch.Tensor], hidden_size: int,
                train: bool) -> torch.Tensor:
    """One batch-first, single-layer, unidirectional ``nn.LSTM`` / ``nn.GRU`` pass from a zero
    state; returns the hidden state of every step (B × T × H)."""
    h0 = x.new_zeros(1, x.shape[0], hidden_size)
    # positional flags: has_biases, num_layers, dropout, train, bidirectional, batch_first
    if cell == "lstm":
        out, _, _ = torch.lstm(x, (h0, h0), weights, True, 1, 0.0, train, False, True)
    else:
        out, _ = torch.gru(x, h0, weights, True, 1, 0.0, train, False, True)
    return out


class Recurrence(nn.Module):
    """The hidden-to-hidden half of a cell (W_hh, b_hh) applied to precomputed input gates."""

    def __init__(self, cell: str, hidden_size: int) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.cell, self.hidden_size = cell, hidden_size
        width = CELLS[cell] * hidden_size
        self.weight_hh = nn.Parameter(torch.empty(width, hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(width))
        bound = hidden_size ** -0.5  # nn.LSTM / nn.GRU initialisation
        nn.init.uniform_(self.weight_hh, -bound, bound)
        nn.init.uniform_(self.bias_hh, -bound, bound)

    def forward(self, gates: torch.Tensor) -> torch.Tensor:
        """``gates``: B × T × (gates·H) input pre-activations W_ih x_t + b_ih."""
        width = gates.shape[-1]
        gates = _GradientTap.apply(gates, self, "_gate_grads")
        # Identity input weight and zero input bias: the kernel's own input projection passes
        # the gates through, so its input gradient is dL/d(gates) (what the tap records).
        identity = torch.eye(width, dtype=gates.dtype, device=gates.device)
        weights = [identity, self.weight_hh, gates.new_zeros(width), self.bias_hh]
        hidden = _run_kernel(self.cell, gates, weights, self.hidden_size, self.training)
        self._hidden = hidden.detach()
        return _GradientTap.apply(hidden, self, "_hidden_grads")


@register_grad_sampler(Recurrence)
def recurrence_grad_sample(layer: Recurrence, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of W_hh and b_hh from what the forward and backward recorded.

    Opacus hands ``backprops`` already scaled for its loss reduction (× batch size for a mean
    loss); the recorded gradients are unscaled, so the same factor is applied to them.
    """
    if not all(hasattr(layer, k) for k in ("_gate_grads", "_hidden_grads", "_hidden")):
        raise RuntimeError("Recurrence: Opacus asked for per-sample gradients before the "
                           "backward pass went through this layer's recurrence (one forward "
                           "per backward, and the layer's input must require grad)")
    gate_grads, raw, hidden = layer._gate_grads, layer._hidden_grads, layer._hidden
    del layer._gate_grads, layer._hidden_grads, layer._hidden
    norm = (raw * raw).sum()
    scale = (backprops * raw).sum() / norm if norm > 0 else norm.new_ones(())
    previous = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    if layer.cell == "gru":
        # n_t = tanh(gi_n + r_t * (W_hn h + b_hn)): the hidden part of the candidate gate gets
        # the gradient of the input part times the reset gate r_t.
        gates_in = activations[0]
        size = layer.hidden_size
        hidden_r = previous @ layer.weight_hh[:size].t() + layer.bias_hh[:size]
        reset = torch.sigmoid(gates_in[..., :size] + hidden_r)
        gate_grads = torch.cat([gate_grads[..., :2 * size],
                                gate_grads[..., 2 * size:] * reset], dim=-1)
    gate_grads = gate_grads * scale
    return {
        layer.weight_hh: torch.einsum("btg,bth->bgh", gate_grads, previous),
        layer.bias_hh: gate_grads.sum(dim=1),
    }


class RecurrentLayer(nn.Module):
    """One LSTM or GRU layer (batch first, zero initial state) returning every hour's state."""

    def __init__(self, cell: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.cell, self.hidden_size = cell, hidden_size
        self.input_projection = nn.Linear(input_size, CELLS[cell] * hidden_size)
        bound = hidden_size ** -0.5  # as nn.LSTM / nn.GRU initialise W_ih and b_ih
        nn.init.uniform_(self.input_projection.weight, -bound, bound)
        nn.init.uniform_(self.input_projection.bias, -bound, bound)
        self.recurrence = Recurrence(cell, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.recurrence._forward_hooks:
            return self.recurrence(self.input_projection(x))
        weights = [self.input_projection.weight, self.recurrence.weight_hh,
                   self.input_projection.bias, self.recurrence.bias_hh]
        return _run_kernel(self.cell, x, weights, self.hidden_size, self.training)


class FastRNN(nn.Module):
    """Stacked ``RecurrentLayer``s with dropout between them, like ``nn.LSTM(batch_first=True)``
    with a zero initial state; ``forward`` returns the last layer's state at every step."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            RecurrentLayer(cell, input_size if i == 0 else hidden_size, hidden_size)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i:
                x = self.dropout(x)
            x = layer(x)
        return x
