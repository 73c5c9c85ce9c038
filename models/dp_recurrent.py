"""LSTM and GRU layers: ``nn.LSTM``'s fused kernel when training is not private, the same
kernel forward plus their own backward through time, giving exact per-sample gradients, under
Opacus DP-SGD.

Opacus's ``DPLSTM`` / ``DPGRU`` unroll the recurrence in Python with one ``nn.Linear`` call per
hour so that its generic Linear hooks see every step: 3-4× slower than ``nn.LSTM`` even without
DP. Here a layer holds ``nn.LSTM``'s four weights (W_ih, W_hh, b_ih, b_hh) and:

- without DP (no Opacus hooks on the layer) runs ``torch.lstm`` / ``torch.gru``, the kernel
  behind ``nn.LSTM`` / ``nn.GRU`` (oneDNN's fused LSTM on CPU), forward and backward;
- under DP (Opacus's hooks-mode ``GradSampleModule`` has put forward hooks on the layer, and
  the model trains with gradients on) runs the same kernel forward without a graph, and its own
  backward (:class:`_RecurrentFunction`): every hour's gate pre-activations are recomputed
  from the kernel's outputs in one matrix product (h_{t-1} is output t-1, so nothing in them
  is sequential), the LSTM cell state in one cheap loop of ``addcmul``, and the gradient at the
  gates, dL/d(gates)[b, t], flows back through the hours with about four small ops per hour.
  The per-sample gradients are then two batched matrix products,
  ∂L_b/∂W_ih = Σ_t dgates[b, t]ᵀ x[b, t] and ∂L_b/∂W_hh = Σ_t dgates[b, t]ᵀ h[b, t-1] (for the
  GRU the candidate gate's hidden part is scaled by the reset gate r), and the biases'
  Σ_t dgates[b, t], computed by the sampler Opacus calls after the backward (Opacus's loss
  scale applied to the gate gradients first, the outputs contiguous for its clip step). Autograd's
  batch gradients are not computed: DP-SGD replaces ``p.grad`` by the noised sum of clipped
  per-sample gradients (``models/layers.py``'s ``Linear`` does the same).

Both paths compute the same function of the same parameters (same state_dict), so the global
model does not depend on which sites trained privately; exactness against one backward pass
per record is tested in tests/test_dp_layers.py (float64, both cells, two layers). One forward
per backward (what a training step does): the recorded tensors belong to the last forward.

Cost (simulations/benchmarks/training.py ``--per-step``, batch 64, 1 thread, CPU time, DP and
plain steps alternated; docs/performance.md has the table): the GRU's DP step is 1.1-1.2× the
plain one, the LSTM's 2.4-2.5× (2.8× before the per-sample products moved to the sampler and
the batch sums went). The plain LSTM is oneDNN's fused kernel; what the DP path adds is the
recomputed gates (two GEMMs over B·T rows), the backward time loop (~5 small ops per hour in
Python: ~1 ms of its ~2.5), the per-sample products (B·4H·(I+H)·T multiply-adds, as many as the
plain backward's weight gradient, ~1 ms) and Opacus's per-parameter clip and noise (~0.8 ms).
What would remove the loop's overhead: a compiled backward-through-time kernel that returns
the gate gradients (no such kernel in torch's CPU build; TorchScript measured 20% faster on the
loop, deprecated).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from models.layers import observed_by_opacus, per_sample_gradients_only

CELLS = {"lstm": 4, "gru": 3}  # gate blocks per cell, in torch's order (i f g o / r z n)


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


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = 2·sigmoid(2x) − 1: torch's CPU tanh is not vectorised in this build (4-5 ns
    per element against 0.5 for sigmoid), and these tensors are B × T × H."""
    return torch.sigmoid(2 * x).mul_(2).sub_(1)


def _lstm_gate_grads(x, previous, grad_out, w_ih, w_hh, b_ih, b_hh):
    """dL/d(gates) of an LSTM, from its inputs and every hour's output. Time-major: every
    tensor here is T × B × ..., so that hour t is one contiguous block."""
    steps, batch, size = grad_out.shape[0], grad_out.shape[1], w_hh.shape[1]
    pre = torch.addmm(b_ih + b_hh, x.reshape(-1, x.shape[-1]), w_ih.t())
    pre = pre.addmm_(previous.reshape(-1, size), w_hh.t()).view(steps, batch, 4 * size)
    pre[..., 2 * size:3 * size] *= 2  # g = tanh(pre_g) = 2·sigmoid(2·pre_g) − 1 (see _tanh)
    act = pre.sigmoid_()
    gate_i, gate_f, gate_o = act[..., :size], act[..., size:2 * size], act[..., 3 * size:]
    gate_g = act[..., 2 * size:3 * size].mul_(2).sub_(1)
    # the cell state c_t = f_t c_{t-1} + i_t g_t: the one sequential recomputation
    cell = gate_i * gate_g
    cells, forgets = cell.unbind(0), gate_f.unbind(0)
    for t in range(1, steps):
        torch.addcmul(cells[t], forgets[t], cells[t - 1], out=cells[t])
    tanh_c = _tanh(cell)
    cell_prev = torch.cat([torch.zeros_like(cell[:1]), cell[:-1]])
    # dgates_t = [dc·g·i(1-i), dc·c_{t-1}·f(1-f), dc·i·(1-g²), dh·tanh(c)·o(1-o)] with
    # dh_t = dL/dh_t + dgates_{t+1} W_hh and dc_t = dh_t·o(1-tanh²c) + dc_{t+1}·f_{t+1}
    coeff_c = torch.stack([gate_g * gate_i * (1 - gate_i), cell_prev * gate_f * (1 - gate_f),
                           gate_i * (1 - gate_g * gate_g)], dim=2).unbind(0)
    coeff_o = (tanh_c * gate_o * (1 - gate_o)).unbind(0)
    dh_to_dc = (gate_o * (1 - tanh_c * tanh_c)).unbind(0)
    gates = torch.empty_like(act)
    rows = gates.unbind(0)
    rows_c = gates[..., :3 * size].unflatten(-1, (3, size)).unbind(0)
    rows_o = gates[..., 3 * size:].unbind(0)
    grads = grad_out.unbind(0)
    dh = grads[-1]
    dc = dh * dh_to_dc[-1]
    for t in range(steps - 1, -1, -1):
        if t < steps - 1:
            dh = torch.addmm(grads[t], rows[t + 1], w_hh)
            dc = torch.addcmul(dc * forgets[t + 1], dh, dh_to_dc[t])
        torch.mul(coeff_c[t], dc.unsqueeze(1), out=rows_c[t])
        torch.mul(coeff_o[t], dh, out=rows_o[t])
    return gates, gates


def _gru_gate_grads(x, previous, grad_out, w_ih, w_hh, b_ih, b_hh):
    """dL/d(input gates), dL/d(hidden gates) of a GRU; time-major like ``_lstm_gate_grads``."""
    steps, batch, size = grad_out.shape[0], grad_out.shape[1], w_hh.shape[1]
    gi = torch.addmm(b_ih, x.reshape(-1, x.shape[-1]), w_ih.t()).view(steps, batch, 3 * size)
    gh = torch.addmm(b_hh, previous.reshape(-1, size), w_hh.t()).view(steps, batch, 3 * size)
    rz = (gi[..., :2 * size] + gh[..., :2 * size]).sigmoid()
    reset, update = rz[..., :size], rz[..., size:]
    new = _tanh(gi[..., 2 * size:] + reset * gh[..., 2 * size:])
    # h_t = (1 - z) n + z h_{t-1}: with dn = dh (1-z)(1-n²), the input gates' gradient is
    # dh·[dn/dh · gh_n · r(1-r), (h_{t-1} - n) z(1-z), (1-z)(1-n²)], the hidden gates' the same
    # with the candidate block times r; dh_{t-1} gets dh_t·z_t + dgh_t W_hh
    k_new = (1 - update) * (1 - new * new)
    coeff_in = torch.stack([k_new * gh[..., 2 * size:] * reset * (1 - reset),
                            (previous - new) * update * (1 - update), k_new], dim=2)
    coeff_hidden = coeff_in.clone()
    coeff_hidden[:, :, 2] *= reset
    coeff_in, coeff_hidden = coeff_in.unbind(0), coeff_hidden.unbind(0)
    grads_in, grads_hidden = torch.empty_like(gi), torch.empty_like(gh)
    rows_in = grads_in.unflatten(-1, (3, size)).unbind(0)
    rows_hidden = grads_hidden.unflatten(-1, (3, size)).unbind(0)
    flat_hidden, updates, grads = grads_hidden.unbind(0), update.unbind(0), grad_out.unbind(0)
    dh = grads[-1]
    for t in range(steps - 1, -1, -1):
        if t < steps - 1:
            dh = torch.addmm(torch.addcmul(grads[t], updates[t + 1], dh),
                             flat_hidden[t + 1], w_hh)
        torch.mul(coeff_in[t], dh.unsqueeze(1), out=rows_in[t])
        torch.mul(coeff_hidden[t], dh.unsqueeze(1), out=rows_hidden[t])
    return grads_in, grads_hidden


_GATE_GRADS = {"lstm": _lstm_gate_grads, "gru": _gru_gate_grads}


class _RecurrentFunction(torch.autograd.Function):
    """The kernel's forward without a graph; backward through time by hand, leaving on
    ``layer._per_sample`` what every record's gradients of the layer's four weights are made of
    (the sampler multiplies them out)."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, layer, input_grad, batch_gradients):
        with torch.no_grad():
            hidden = _run_kernel(layer.cell, x, [w_ih, w_hh, b_ih, b_hh], layer.hidden_size,
                                 True)
        # batch_gradients: ghost clipping, whose second backward reads p.grad
        ctx.layer, ctx.input_grad, ctx.batch_gradients = layer, input_grad, batch_gradients
        ctx.save_for_backward(x, hidden, w_ih, w_hh, b_ih, b_hh)
        return hidden

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        layer = ctx.layer
        previous = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        time_major = [t.transpose(0, 1).contiguous() for t in (x, previous, grad_out)]
        grads_in, grads_hidden = _GATE_GRADS[layer.cell](*time_major, w_ih, w_hh, b_ih, b_hh)
        layer._per_sample = (x, previous, grads_in, grads_hidden, grad_out)
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.input_grad:
            grad_x = (grads_in @ w_ih).transpose(0, 1)
        if ctx.batch_gradients:  # ghost clipping's second backward reads p.grad
            xs, hs = time_major[0].flatten(0, 1), time_major[1].flatten(0, 1)
            g_in, g_hidden = grads_in.flatten(0, 1), grads_hidden.flatten(0, 1)
            return (grad_x, g_in.T @ xs, g_hidden.T @ hs, g_in.sum(dim=0), g_hidden.sum(dim=0),
                    None, None, None)
        # No weight gradients: DP-SGD replaces p.grad by the noised sum of clipped per-sample
        # gradients, so autograd's batch sums would be computed for nothing (as models/layers.py's
        # Linear does, p.grad stays unset until the optimizer step).
        return grad_x, None, None, None, None, None, None, None


class RecurrentLayer(nn.Module):
    """One LSTM or GRU layer (batch first, zero initial state) returning every hour's state;
    its parameters are ``nn.LSTM``'s ``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0`` under the names ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``."""

    def __init__(self, cell: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        width = CELLS[cell] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(width, input_size))
        self.weight_hh = nn.Parameter(torch.empty(width, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(width))
        self.bias_hh = nn.Parameter(torch.empty(width))
        bound = hidden_size ** -0.5  # nn.LSTM / nn.GRU initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def records_per_sample_gradients(self) -> bool:
        """Whether the next forward takes the DP path: Opacus's hooks-mode GradSampleModule
        observes the layer (forward hooks) and the model trains with gradients on."""
        return observed_by_opacus(self)

    def forward(self, x: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """``probe``: ``x`` is a leaf made to require grad only so that Opacus's full backward
        hook fires after this layer's backward (see ``FastRNN.forward``); its gradient is not
        computed."""
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if self.records_per_sample_gradients():
            # decided here: autograd runs a Function's forward with gradients off
            return _RecurrentFunction.apply(x, *weights, self, not probe,
                                            not per_sample_gradients_only(self))
        return _run_kernel(self.cell, x, weights, self.hidden_size, self.training)


@register_grad_sampler(RecurrentLayer)
def recurrent_grad_sample(layer: RecurrentLayer, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Every record's gradients of the layer's four weights, from what its backward recorded:
    ∂L_b/∂W_ih = Σ_t dgates[t, b]ᵀ x[b, t], ∂L_b/∂W_hh = Σ_t dgates[t, b]ᵀ h[b, t-1] (batched
    products written straight into contiguous B × gates × inputs tensors, which Opacus's clip
    step reads twice) and the biases' Σ_t dgates[t, b].

    Opacus hands ``backprops`` already scaled for its loss reduction (× batch size for a mean
    loss); the recorded gradients are unscaled, so the same factor is applied to the gate
    gradients first (the smallest tensor they all come from).
    """
    if not hasattr(layer, "_per_sample"):
        raise RuntimeError("RecurrentLayer: Opacus asked for per-sample gradients before the "
                           "backward pass went through this layer (one forward per backward)")
    x, previous, grads_in, grads_hidden, raw = layer._per_sample
    del layer._per_sample
    norm = (raw * raw).sum()
    # torch.where, not `if norm > 0`: no host sync per layer and step on CUDA
    scale = torch.where(norm > 0, (backprops * raw).sum() / norm, torch.ones_like(norm))
    same = grads_hidden is grads_in  # LSTM: both weights see the same gate gradients
    grads_in = grads_in * scale  # T × B × gates
    grads_hidden = grads_in if same else grads_hidden * scale
    # per record b: (T × gates)ᵀ (T × inputs), reading the time-major gates as B × gates × T
    weight_ih = torch.bmm(grads_in.permute(1, 2, 0), x)
    weight_hh = torch.bmm(grads_hidden.permute(1, 2, 0), previous)
    bias_ih = grads_in.sum(dim=0)
    bias_hh = bias_ih if same else grads_hidden.sum(dim=0)
    per_sample = {layer.weight_ih: weight_ih, layer.weight_hh: weight_hh,
                  layer.bias_ih: bias_ih, layer.bias_hh: bias_hh}
    return {p: g for p, g in per_sample.items() if p.requires_grad}


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
            probe = not x.requires_grad and layer.records_per_sample_gradients()
            if probe:
                # A full backward hook (how Opacus sees a layer's output gradient) fires before
                # the layer's own backward when no input needs a gradient: give it one.
                x = x.detach().requires_grad_()
            x = layer(x, probe=probe)
        return x
