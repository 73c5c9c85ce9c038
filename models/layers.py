"""Small pieces several model families share (each family keeps its own file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


KEEP_BATCH_GRADIENTS = "keeps_batch_gradients"  # attribute set by keep_batch_gradients


def observed_by_opacus(module: nn.Module) -> bool:
    """Opacus's GradSampleModule observes ``module`` (forward hooks) and the model trains with
    gradients on: its next backward is one whose per-sample gradients are taken."""
    return module.training and torch.is_grad_enabled() and bool(module._forward_hooks)


def per_sample_gradients_only(module: nn.Module) -> bool:
    """Whether ``module``'s next forward may leave its weights' batch gradient uncomputed
    (:class:`Linear`, :class:`Conv2d`, models/dp_recurrent.py's ``RecurrentLayer``): Opacus
    observes it in hooks mode, so the DP optimizer replaces ``p.grad`` by the noised sum of
    clipped per-sample gradients and never reads autograd's. Not under ghost clipping, whose
    second backward reads ``p.grad`` (:func:`keep_batch_gradients`). The one place this is
    decided."""
    return observed_by_opacus(module) and not getattr(module, KEEP_BATCH_GRADIENTS, False)


def keep_batch_gradients(model: nn.Module) -> None:
    """Every layer of ``model`` computes autograd's batch weight gradients even while Opacus
    observes it: call before a ghost-clipping ``make_private`` (its second backward pass, on
    the loss rescaled by the clipping factors, is what fills ``p.grad``)."""
    for module in model.modules():
        setattr(module, KEEP_BATCH_GRADIENTS, True)


class _InputGradientOnly(torch.autograd.Function):
    """``F.linear`` whose backward computes the input's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same function) that, under Opacus DP-SGD in hooks mode,
    leaves its weight and bias gradients to the per-sample ones.

    Autograd's weight gradient Σ_records gᵀa costs as much as the per-sample gradients Opacus
    computes from the same tensors, and DP-SGD never reads it: the DP optimizer replaces
    ``p.grad`` by the noised sum of clipped per-sample gradients. So while Opacus observes
    the layer (forward hooks, training, gradients on), the backward computes only the input's
    gradient and ``p.grad`` stays unset until the optimizer step; otherwise this is
    ``nn.Linear``. Per-sample gradients: Opacus's Linear sampler.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if per_sample_gradients_only(self):
            return _InputGradientOnly.apply(x, self.weight, self.bias)
        return super().forward(x)


def register_linear_grad_sampler() -> None:
    """Opacus's Linear sampler for :class:`Linear` (Opacus matches a layer's exact type, not its
    base class). Imports Opacus: called on the DP path only (``models.register_grad_samplers``)."""
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.linear import compute_linear_grad_sample

    register_grad_sampler(Linear)(compute_linear_grad_sample)


class _ConvInputGradientOnly(torch.autograd.Function):
    """``F.conv2d`` whose backward computes the input's gradient only (none when the input
    needs none: a first layer's input is data)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride, padding, dilation, groups: int):
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.conv = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, *ctx.conv)
        return grad_x, None, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same function) that, under Opacus DP-SGD in hooks mode,
    leaves its weight and bias gradients to the per-sample ones, as :class:`Linear` does: the
    batch weight gradient is one more convolution the DP optimizer throws away (on the images
    CNN, the first block's weight gradient cost as much as its per-sample gradients). Zero
    padding given as numbers only (what models/dp_conv.py's sampler covers; Opacus's own
    sampler recognises ``nn.Conv2d`` by exact type). Without DP this is ``nn.Conv2d``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"models.layers.Conv2d takes zero padding given as numbers, got "
                             f"padding={self.padding!r}, padding_mode={self.padding_mode!r} "
                             "(use nn.Conv2d for these)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if per_sample_gradients_only(self):
            return _ConvInputGradientOnly.apply(x, self.weight, self.bias, self.stride,
                                                self.padding, self.dilation, self.groups)
        return super().forward(x)
