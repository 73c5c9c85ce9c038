"""Local training at one site: plain PyTorch, no Flower inside (unit-testable, benchmarkable).

torch and Opacus are imported by the functions that run them: the configuration, seeding and
outcome types here are also used by processes that never train (a SuperNode starts one per
message: client/app.py's refusals and secure-aggregation stages must not pay for torch).
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy.protocol import CLASS_BALANCE
from privacy.run_settings import TrainSettings

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

# Expected and harmless under DP: Opacus's "Secure RNG turned off" (privacy.secure_noise
# covers it) and torch's notice about a full backward hook on a first layer whose input needs
# no gradient. Registered once, at import.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class LocalTrainingConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    optimizer: str = "sgd"  # sgd (with momentum) | adam
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: the site adds mu/2 * ||w - w_global||^2 to its loss
    # Logit adjustment (Menon et al. 2021; FedLC, Zhang et al. 2022): the training loss sees
    # logits + log(site class prior), so a site where a class is rare does not pull the shared
    # model towards its own majority; the model's own logits aim at balanced error.
    class_prior: tuple[float, ...] | None = None


def local_training_config(
    train: TrainSettings, *, dp: bool, train_labels: np.ndarray | None = None,
    num_classes: int | None = None, proximal_mu: float = 0.0,
    public_prior: Sequence[float] | None = None,
) -> LocalTrainingConfig:
    """One round of local training from the ``train`` settings the server sends (the site and
    the simulation's baselines read them here, the same way).

    ``class_balance=logit_adjust`` adds log(class prior) to the training logits. Without DP the
    prior is the site's own label counts (``train_labels``). Under DP-SGD those counts are a
    function of every record that per-example clipping does not bound, so a DP site uses only a
    *public* prior from configuration (``task.class_prior``, e.g. a published prevalence: no
    record influences it) and refuses otherwise. ``auto``: the site's prior without DP, the
    public prior under DP when there is one, else none.
    """
    balance = train.class_balance
    if balance not in CLASS_BALANCE:
        raise ValueError(f"class_balance must be one of {CLASS_BALANCE}, got {balance!r}")
    if balance == "auto":
        balance = "none" if dp and public_prior is None else "logit_adjust"
    prior = None
    if balance == "logit_adjust" and dp:
        if public_prior is None:
            raise ValueError("class_balance=logit_adjust under DP needs a public prior "
                             "(task.class_prior): the site's exact label counts are not covered "
                             "by DP-SGD")
        prior = tuple(float(p) / float(sum(public_prior)) for p in public_prior)
    elif balance == "logit_adjust":
        if train_labels is None or num_classes is None:
            raise ValueError("class_balance=logit_adjust needs the training labels")
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
        prior = tuple(float(c) / max(int(counts.sum()), 1) for c in counts)
    return LocalTrainingConfig(
        epochs=train.local_epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        momentum=train.momentum,
        optimizer=train.optimizer,
        weight_decay=train.weight_decay,
        proximal_mu=proximal_mu,
        class_prior=prior,
    )


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD at the site: Poisson sampling, per-sample clipping, Gaussian noise (Opacus)."""

    noise_multiplier: float
    max_grad_norm: float
    # noise from a ChaCha20 CSPRNG (privacy/secure_noise.py) and Poisson batches seeded from
    # the OS: nothing a party knowing the run's seed can reproduce
    secure_noise: bool = False
    # How Opacus gets per-sample gradient norms: hooks | ghost | ew | functorch. None: the
    # model's own choice (its ``grad_sample_mode`` class attribute, chosen by measurement for
    # its layers: simulations/benchmarks/training.py), else hooks.
    grad_sample_mode: str | None = None
    # Poisson batches per epoch, i.e. sample rate q = 1 / batches. None: ceil(n / batch size)
    # from the exact n; a site that releases only a noisy count ñ passes ceil(ñ / batch size),
    # so q (which the server sees in the ledger summary) never depends on the exact n.
    batches: int | None = None


def grad_sample_mode_for(model: nn.Module, dp: DPConfig) -> str:
    return dp.grad_sample_mode or getattr(model, "grad_sample_mode", None) or "hooks"


@dataclass
class TrainOutcome:
    """What one local round produced (client/app.py ``train_round``): the trained model, or
    ``None`` when the site declined (privacy budget) or refused (unapproved app, other task)."""

    model: nn.Module | None
    metrics: dict[str, float]
    ledger: dict[str, Any] | None = None
    declined: str | None = None
    refused: str | None = None


def dp_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, steps per round) exactly as Opacus's Poisson loader will run them:
    q = 1/len(loader), one step per loader batch, empty batches included."""
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, batches * epochs


def site_seed(seed: int, site_id: str, server_round: int) -> int:
    """A seed that differs per site and round but is stable across runs (no Python hash())."""
    return (seed * 1_000_003 + zlib.crc32(site_id.encode()) * 7_919 + server_round) % 2**63


def resolve_device(requested: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is available here")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device=mps was requested but MPS is not available here")
    return requested


# Run on every local step after backward() and before optimizer.step(), empty Poisson batches
# included: (model, the step's sample rate q = 1/len(loader), records in this batch). The privacy
# audit (simulations/audit/federated.py) injects its white-box gradient canaries here, where
# DP-SGD has per-sample gradients but has not yet clipped, summed or noised them.
StepHook = Callable[["nn.Module", float, int], None]


def train_local(
    model: nn.Module,
    dataset: Dataset,
    config: LocalTrainingConfig,
    *,
    seed: int,
    device: str = "cpu",
    dp: DPConfig | None = None,
    step_hook: StepHook | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``dataset``; returns the step count and, without DP, the
    mean training loss.

    With ``dp`` the model is trained with Opacus DP-SGD and is left unwrapped (its state_dict
    keys unchanged, no hooks left behind), ready to be sent or evaluated. Under DP no
    ``train_loss`` is returned: the un-noised mean loss over the site's records is a statistic
    of the training data that DP-SGD's clipping and noise do not cover, and these metrics are
    sent to the server with the update.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    if dp is not None and dp.secure_noise:
        # Which records a Poisson batch holds must be secret too (amplification by sampling
        # assumes it): seeded from the OS, not from the run's seed the server chose
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    torch.manual_seed(seed)  # dropout masks
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    if dp is not None and dp.batches is not None:
        # Opacus takes q = 1 / len(loader) and draws its own Poisson batches: a loader of
        # exactly ``batches`` placeholder batches fixes q without looking at n
        loader = DataLoader(dataset, batch_sampler=[[0]] * int(dp.batches), generator=generator)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    hooks = None
    criterion = nn.CrossEntropyLoss()
    if dp is not None:
        if config.proximal_mu > 0:
            raise ValueError("FedProx's proximal term is not clipped per sample; it cannot be "
                             "combined with DP-SGD")
        hooks, optimizer, criterion, loader = make_private(
            model, optimizer, loader, criterion, dp, seed=seed, device=device,
            dense_per_sample=step_hook is not None)
    anchor = _proximal_anchor(model) if config.proximal_mu > 0 else None
    adjustment = None
    if config.class_prior is not None:
        # a class absent from the site still gets a finite (very negative) offset
        prior = torch.tensor(config.class_prior, dtype=torch.float32).clamp(min=1e-3)
        adjustment = torch.log(prior / prior.sum()).to(device)
    total_loss, total_examples, steps = 0.0, 0, 0
    try:
        for _ in range(config.epochs):
            # Under DP the accountant must see every step, including empty Poisson batches:
            # they are never skipped (the optimizer still noises and counts them).
            for *inputs, labels in loader:
                inputs = [t.to(device) for t in inputs]
                labels = labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = model(*inputs)
                if adjustment is not None:
                    logits = logits + adjustment
                loss = criterion(logits, labels)
                objective = loss
                if anchor is not None:
                    objective = loss + 0.5 * config.proximal_mu * _sq_distance(model, anchor)
                objective.backward()
                if step_hook is not None:
                    step_hook(model, 1.0 / len(loader), len(labels))
                optimizer.step()
                # under DP the loss is not reported (see above): no host sync per step for it
                if dp is None and len(labels):
                    total_loss += float(loss.detach()) * len(labels)
                    total_examples += len(labels)
                steps += 1
    finally:
        if hooks is not None:
            from models.dp_embedding import release_sparse_embeddings

            hooks.cleanup()
            release_sparse_embeddings(model)
    if dp is not None:
        # steps = epochs / q: nothing the ledger sent with the update (its sample rate q) does
        # not already say
        return {"steps": float(steps)}
    return {"train_loss": total_loss / max(total_examples, 1), "steps": float(steps)}


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                 criterion: Any, dp: DPConfig, *, seed: int, device: str,
                 dense_per_sample: bool = False) -> tuple[Any, Any, Any, Any]:
    """Opacus DP-SGD around ``model`` and ``optimizer``: (hooks, DP optimizer, criterion, Poisson
    loader). The model is not wrapped (state_dict keys unchanged); ``hooks.cleanup()`` and
    ``release_sparse_embeddings(model)`` undo it.

    With hooks, embedding tables keep their per-sample gradients sparse (the rows each record
    touched, models/dp_embedding.py) unless ``dense_per_sample``: the privacy audit's gradient
    canaries are appended to Opacus's dense ``p.grad_sample``.
    """
    import torch
    from opacus import PrivacyEngine

    from models import register_grad_samplers
    from models.dp_embedding import use_sparse_embeddings

    register_grad_samplers()  # before Opacus picks each layer's sampler
    engine = PrivacyEngine(accountant="rdp")  # the site's ledger does the accounting
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    mode = grad_sample_mode_for(model, dp)
    if mode == "ghost":
        from models.layers import keep_batch_gradients

        keep_batch_gradients(model)  # its second backward reads p.grad
    private = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True, noise_generator=noise, wrap_model=False,
        grad_sample_mode=mode, **({"criterion": criterion} if mode == "ghost" else {}),
    )
    # Ghost clipping returns a criterion whose backward() runs both passes (norms, then
    # the clipped sum); the others return (hooks, optimizer, loader).
    if mode == "ghost":
        hooks, optimizer, criterion, loader = private
    else:
        hooks, optimizer, loader = private
        if not dense_per_sample:
            optimizer = use_sparse_embeddings(optimizer, model)
    if dp.secure_noise:
        from privacy.secure_noise import use_secure_noise

        optimizer = use_secure_noise(optimizer)
    return hooks, optimizer, criterion, loader


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(model: nn.Module, config: LocalTrainingConfig) -> torch.optim.Optimizer:
    """A fresh local optimizer each round (its state never leaves the site nor persists)."""
    import torch

    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def _proximal_anchor(model: nn.Module) -> Mapping[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _sq_distance(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
