"""Canaries for the one-run audit (Steinke, Nasr, Jagielski 2023, §6–7): what goes in, its score.

Every canary is included in training independently with probability ½ (:func:`canary_inclusion`);
the audit then ranks the canaries by score and turns correct guesses into an ε lower bound
(:mod:`simulations.audit.lower_bound`). Two kinds:

Black-box input canaries (:func:`input_canaries`, :func:`loss_scores`)
    Records with uniformly random inputs and random labels, added to the auditing site's training
    split; the score is minus the canary's loss under the final global model (an included canary
    is fitted, so its loss is lower). Only the final model is needed.

White-box gradient canaries (:class:`GradientCanaries`)
    A "Dirac" per-sample gradient: zero everywhere except one coordinate, set to the clip norm C,
    so clipping leaves it whole and it moves exactly one parameter. Canary i owns coordinate
    ``coordinates[i]`` (distinct for all canaries, drawn from ``seed``), so canaries never
    interfere. The score is the global model's change along that coordinate in the descent
    direction: ``before − after`` (or ``−update`` for an update ``after − before``).

How to inject white-box canaries into a site's DP-SGD (Opacus, ``grad_sample_mode="hooks"``):

1. Before training, at the auditing site: ``canaries = GradientCanaries.for_model(model, m,
   seed=audit_seed, clip_norm=dp.max_grad_norm)`` and ``included = canary_inclusion(m, seed)``.
   The same seed at the auditor recomputes coordinates and inclusion; neither leaves the site.
2. Each step, after ``loss.backward()`` and BEFORE ``optimizer.step()`` (which clips, sums,
   noises): ``sampled = canaries.sample(included, sample_rate, generator)`` draws each included
   canary with the loader's Poisson rate q, exactly as a real record is drawn, and
   ``canaries.inject(model, sampled)`` appends one row per sampled canary to every trainable
   parameter's ``p.grad_sample``. Do it on every step, empty Poisson batches included.
   The optimizer then clips each row (a canary row has norm C, so it is kept whole), sums,
   adds N(0, σ²C²) once per step, divides by the expected batch size: the canary is treated
   exactly like one more record of the site, so the accountant's (σ, q, steps) covers it.
3. After the run: ``scores = canaries.scores(global_before, global_after)`` with the global
   state dicts before the first and after the last audited round (the site's update alone
   works too: ``canaries.scores_from_update(update)``), then
   ``audit_epsilon(scores, included, delta)``.

Notes for the integration: needs per-sample gradients in ``p.grad_sample`` (hooks or functorch
mode; ghost clipping never materializes them); parameter names are those of
``model.named_parameters()`` with ``wrap_model=False``. Any optimizer works for ranking
(momentum, Adam and weight decay shift every coordinate alike); SGD gives the cleanest signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simulations.audit.membership import per_example_loss


def canary_inclusion(m: int, seed: int) -> np.ndarray:
    """Which of m canaries are inserted: each independently with probability ½ (the audit's
    randomness; the p-value of the lower bound assumes exactly this)."""
    if m < 1:
        raise ValueError(f"number of canaries m must be >= 1, got {m}")
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(m, generator=generator, dtype=torch.float64) < 0.5).numpy()


def input_canaries(m: int, input_shape: Sequence[int], num_classes: int, seed: int, *,
                   low: float = 0.0, high: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """m black-box canary records: uniform random inputs in [low, high] with uniform random labels.

    Random inputs are far from the data, so a model only fits one it has trained on: the
    black-box canaries of Steinke et al. §7 (mislabeled / out-of-distribution examples).
    """
    if m < 1 or num_classes < 2:
        raise ValueError(f"need m >= 1 canaries and num_classes >= 2, got {m}, {num_classes}")
    if not low < high:
        raise ValueError(f"input range must have low < high, got [{low}, {high}]")
    generator = torch.Generator().manual_seed(seed)
    inputs = low + (high - low) * torch.rand(m, *input_shape, generator=generator)
    labels = torch.randint(num_classes, (m,), generator=generator)
    return inputs, labels


def loss_scores(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                batch_size: int = 256) -> np.ndarray:
    """Black-box canary scores: minus each canary's cross-entropy under ``model`` (higher = in)."""
    return -per_example_loss(model, inputs, labels, batch_size=batch_size)


ParamShapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class GradientCanaries:
    """m white-box Dirac gradient canaries on a model with the given trainable parameters."""

    param_shapes: dict[str, tuple[int, ...]]
    coordinates: tuple[tuple[str, int], ...]  # canary i → (parameter name, flat index)
    clip_norm: float

    @classmethod
    def for_shapes(cls, param_shapes: ParamShapes, m: int, *, seed: int,
                   clip_norm: float) -> GradientCanaries:
        shapes = {name: tuple(int(d) for d in shape) for name, shape in param_shapes.items()}
        if m < 1:
            raise ValueError(f"number of gradient canaries m must be >= 1, got {m}")
        return cls(shapes, _coordinates(shapes, m, seed), float(clip_norm))

    @classmethod
    def for_model(cls, model: nn.Module, m: int, *, seed: int,
                  clip_norm: float) -> GradientCanaries:
        return cls.for_shapes(trainable_shapes(model), m, seed=seed, clip_norm=clip_norm)

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")

    @property
    def m(self) -> int:
        return len(self.coordinates)

    def gradient(self, index: int) -> dict[str, torch.Tensor]:
        """The per-sample gradient of canary ``index``: every trainable parameter, all zeros
        except the canary's coordinate, which is ``clip_norm`` (so its L2 norm is exactly C)."""
        return {name: rows[0] for name, rows in self.rows([index]).items()}

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-sample gradients of several canaries: name → tensor [len(indices), *shape]."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.m for i in indices):
            raise ValueError(f"canary indices must be in [0, {self.m}), got {indices}")
        stacked = {name: torch.zeros(len(indices), int(np.prod(shape)))
                   for name, shape in self.param_shapes.items()}
        for row, i in enumerate(indices):
            name, flat = self.coordinates[i]
            stacked[name][row, flat] = self.clip_norm
        return {name: t.view(len(indices), *self.param_shapes[name]) for name, t in stacked.items()}

    def sample(self, included: np.ndarray, sample_rate: float,
               generator: torch.Generator) -> list[int]:
        """The included canaries drawn into this step's Poisson batch (each w.p. sample_rate)."""
        included = np.asarray(included, dtype=bool)
        if included.shape != (self.m,):
            raise ValueError(f"included must have shape ({self.m},), got {included.shape}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        draws = torch.rand(self.m, generator=generator, dtype=torch.float64).numpy() < sample_rate
        return np.flatnonzero(included & draws).tolist()

    def inject(self, model: nn.Module, indices: Sequence[int]) -> None:
        """Append the canaries' per-sample gradients to ``p.grad_sample`` (Opacus) of ``model``:
        call after ``backward()`` and before the DP optimizer's ``step()``."""
        if not indices:
            return
        params = dict(model.named_parameters())
        for name, rows in self.rows(indices).items():
            param = params.get(name)
            if param is None:
                raise ValueError(f"canary parameter {name!r} is not a parameter of the model "
                                 f"(expected one of {sorted(params)})")
            current = getattr(param, "grad_sample", None)
            if current is None:
                raise ValueError(f"parameter {name!r} has no per-sample gradient (p.grad_sample); "
                                 "inject after backward() with Opacus grad_sample_mode='hooks'")
            if isinstance(current, list):  # a parameter used twice in the forward pass
                current = torch.cat(current, dim=0)
            param.grad_sample = torch.cat(
                [current, rows.to(device=current.device, dtype=current.dtype)], dim=0)

    def scores_from_update(self, update: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Score per canary from a model update (after − before): the step against the canary's
        gradient, ``−update[coordinate]`` (higher = in)."""
        missing = sorted({name for name, _ in self.coordinates} - set(update))
        if missing:
            raise ValueError(f"update lacks canary parameters {missing}")
        flat = {name: update[name].detach().reshape(-1).double().cpu()
                for name in {name for name, _ in self.coordinates}}
        return np.array([-float(flat[name][i]) for name, i in self.coordinates])

    def scores(self, before: Mapping[str, torch.Tensor],
               after: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Score per canary from the global model before and after training (higher = in)."""
        names = {name for name, _ in self.coordinates}
        missing = sorted(n for n in names if n not in before or n not in after)
        if missing:
            raise ValueError(f"model states lack canary parameters {missing}")
        return self.scores_from_update({n: after[n].double() - before[n].double() for n in names})


def trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters DP-SGD updates, by ``named_parameters()`` name."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def canary_coordinate(param_shapes: ParamShapes, index: int, seed: int) -> tuple[str, int]:
    """(parameter name, flat index) of canary ``index``: position ``index`` of a seeded random
    permutation of all coordinates, so canaries never share a coordinate."""
    return _coordinates(param_shapes, index + 1, seed)[index]


def _coordinates(param_shapes: ParamShapes, m: int, seed: int) -> tuple[tuple[str, int], ...]:
    names = list(param_shapes)
    sizes = [int(np.prod(param_shapes[n])) for n in names]
    total = sum(sizes)
    if not names or total == 0:
        raise ValueError("the model has no trainable parameters to place canaries on")
    if m > total:
        raise ValueError(f"{m} gradient canaries need {m} distinct coordinates but the model "
                         f"has only {total} trainable parameters")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:m].tolist()
    offsets = np.cumsum([0, *sizes])
    out = []
    for flat in chosen:
        k = int(np.searchsorted(offsets, flat, side="right") - 1)
        out.append((names[k], int(flat - offsets[k])))
    return tuple(out)
