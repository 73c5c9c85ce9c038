"""Gradient inversion: what the server could rebuild from one site's update.

DLG (Zhu, Liu, Han, NeurIPS 2019): optimize a dummy input so that its gradient matches the observed
one in L2, with L-BFGS. The label of a single-record update is read off the last layer first
(iDLG, Zhao et al. 2020: with cross-entropy only the true class's row of the last weight's
gradient is negative when the features feeding it are non-negative), so only the input is solved
for. ``method="ig"`` is Inverting Gradients (Geiping et al., NeurIPS 2020): cosine distance + total
variation, Adam — slower but robust for larger models.

The three views of an update the audit attacks (issue 7 §3):
- plaintext: the gradient itself (:func:`record_gradient`);
- DP-noised: clipped to C and noised with N(0, σ²C²) as DP-SGD does for a one-record batch
  (:func:`dp_noised_gradient`);
- SecAgg-masked: what the server receives from one site before unmasking: the fixed-point
  encoding plus a uniform mask mod 2^32, i.e. a uniform uint32 vector
  (:func:`masked_upload_view`), decoded as the server would decode a sum.

Success is measured by PSNR against the true record, beside the flat-image baseline: the best
constant image (the true image's own mean), which an attacker gets without learning anything
about the layout. A reconstruction at or below that baseline revealed nothing visual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

METHODS = ("dlg", "ig")


def record_gradient(model: nn.Module, image: torch.Tensor, label: int) -> list[torch.Tensor]:
    """The gradient of one record's cross-entropy w.r.t. every trainable parameter (in order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(image[None]), torch.tensor([int(label)], device=image.device))
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def infer_label(gradient: Sequence[torch.Tensor]) -> int:
    """iDLG: the class whose row of the last weight matrix's gradient is most negative.

    ``gradient`` is in ``model.parameters()`` order with the last layer's weight as the
    second-to-last tensor (weight, bias). For a single record dL/dW[c] = (p_c − 1[c=y])·h.
    """
    weight = next((g for g in reversed(list(gradient)) if g.dim() == 2), None)
    if weight is None:
        raise ValueError("no 2-D (linear layer) weight gradient to read the label from")
    return int(weight.sum(dim=1).argmin())


def dp_noised_gradient(gradient: Sequence[torch.Tensor], clip_norm: float,
                       noise_multiplier: float, generator: torch.Generator) -> list[torch.Tensor]:
    """DP-SGD's view of a one-record step: clip the whole gradient to L2 ≤ C, add N(0, σ²C²)."""
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"need clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, "
                         f"{noise_multiplier}")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gradient))
    factor = min(1.0, clip_norm / (float(norm) + 1e-6))
    return [g * factor + noise_multiplier * clip_norm
            * torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in gradient]


def masked_upload_view(gradient: Sequence[torch.Tensor], seed: int, *,
                       scale: float = 2.0 ** 16) -> list[torch.Tensor]:
    """One site's SecAgg upload as the server sees it: fixed-point gradient + uniform mask mod 2^32,
    decoded (two's complement, ÷ scale) as the server decodes the unmasked sum."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for g in gradient:
        encoded = torch.round(g.double() * scale).to(torch.int64) % 2 ** 32
        mask = torch.randint(0, 2 ** 32, g.shape, generator=generator, dtype=torch.int64)
        masked = (encoded + mask) % 2 ** 32  # uniform on the ring whatever the gradient
        signed = torch.where(masked >= 2 ** 31, masked - 2 ** 32, masked)
        out.append((signed.double() / scale).to(g.dtype))
    return out


def psnr(reconstruction: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, after clamping the reconstruction to the data range."""
    if reconstruction.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(reconstruction.shape)} vs {tuple(truth.shape)}")
    mse = float(((reconstruction.clamp(0, data_range) - truth) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def flat_baseline(truth: torch.Tensor) -> torch.Tensor:
    """The best constant image (every pixel at the true mean): PSNR that carries no layout."""
    return torch.full_like(truth, float(truth.mean()))


@dataclass(frozen=True)
class Reconstruction:
    image: torch.Tensor
    label: int
    psnr: float
    baseline_psnr: float
    gradient_distance: float  # the final matching objective
    seconds: float

    @property
    def beats_baseline(self) -> bool:
        return self.psnr > self.baseline_psnr


def reconstruct(model: nn.Module, gradient: Sequence[torch.Tensor], input_shape: Sequence[int],
                *, truth: torch.Tensor | None = None, label: int | None = None,
                method: str = "dlg", iterations: int = 300, seed: int = 0,
                tv_weight: float = 1e-2) -> Reconstruction:
    """Rebuild one record from its gradient. ``iterations`` counts objective evaluations.

    The model's weights must be those the gradient was taken at (the global model of the round).
    ``truth`` (optional) is used only to report PSNR and the flat baseline.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    gradient = [g.detach().to(params[0].device) for g in gradient]
    if len(gradient) != len(params) or any(g.shape != p.shape for g, p in zip(gradient, params)):
        raise ValueError("gradient must hold one tensor per trainable parameter, in "
                         "model.parameters() order and of the same shapes")
    if not all(torch.isfinite(g).all() for g in gradient):
        raise ValueError("gradient has non-finite values")
    started = time.perf_counter()
    label = infer_label(gradient) if label is None else int(label)
    target = torch.tensor([label], device=params[0].device)
    generator = torch.Generator().manual_seed(seed)
    dummy = torch.rand(1, *input_shape, generator=generator, dtype=params[0].dtype)
    dummy = dummy.to(params[0].device)
    dummy.requires_grad_(True)

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(model(dummy), target)
        dummy_grad = torch.autograd.grad(loss, params, create_graph=True)
        if method == "dlg":
            return sum(((d - g) ** 2).sum() for d, g in zip(dummy_grad, gradient))
        dot = sum((d * g).sum() for d, g in zip(dummy_grad, gradient))
        norms = torch.sqrt(sum((d ** 2).sum() for d in dummy_grad)) \
            * torch.sqrt(sum((g ** 2).sum() for g in gradient))
        tv = (dummy[..., 1:, :] - dummy[..., :-1, :]).abs().mean() \
            + (dummy[..., :, 1:] - dummy[..., :, :-1]).abs().mean()
        return 1 - dot / (norms + 1e-12) + tv_weight * tv

    last = torch.tensor(float("nan"))
    if method == "dlg":
        optimizer = torch.optim.LBFGS([dummy], lr=1, max_iter=iterations,
                                      tolerance_grad=1e-12, tolerance_change=1e-14,
                                      history_size=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective()
            value.backward()
            return value

        optimizer.step(closure)
        last = objective().detach()
    else:
        optimizer = torch.optim.Adam([dummy], lr=0.1)
        for _ in range(iterations):
            optimizer.zero_grad()
            last = objective()
            last.backward()
            optimizer.step()
            with torch.no_grad():
                dummy.clamp_(0, 1)
        last = last.detach()
    image = dummy.detach()[0].clamp(0, 1).cpu()
    seconds = time.perf_counter() - started
    if truth is None:
        return Reconstruction(image, label, math.nan, math.nan, float(last), seconds)
    truth = truth.detach().cpu()
    return Reconstruction(image, label, psnr(image, truth), psnr(flat_baseline(truth), truth),
                          float(last), seconds)
