"""The site's privacy ledger: where it is kept, how σ is planned, and the budget check.

The ledger lives in ``Context.state`` (it survives rounds in simulation and deployment) and,
when the site has a state directory, in a file there (it survives a SuperNode restart). The
file wins: it is written after every round, atomically. A ledger is never reset by the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

from client.site import SiteSettings
from client.training import (
    DPConfig,
    LocalTrainingConfig,
    StepHook,
    dp_schedule,
    train_local,
)
from privacy.accounting import (
    PrivacyLedger,
    count_release_entries,
    default_delta,
    noise_multiplier_for,
    noisy_count,
)

if TYPE_CHECKING:  # torch only where the site trains (client/training.py says why)
    import torch
    from torch.utils.data import Dataset

LEDGER_FILE = "privacy_ledger.json"
STATE_KEY = "privacy-ledger"


def load_ledger(site: SiteSettings, context: Context) -> PrivacyLedger | None:
    if site.state_dir is not None and (site.state_dir / LEDGER_FILE).is_file():
        return PrivacyLedger.load(site.state_dir / LEDGER_FILE)
    if STATE_KEY in context.state:
        return PrivacyLedger.from_dict(json.loads(str(context.state[STATE_KEY]["json"])))
    return None


def save_ledger(site: SiteSettings, context: Context, ledger: PrivacyLedger) -> None:
    context.state[STATE_KEY] = ConfigRecord({"json": json.dumps(ledger.to_dict())})
    if site.state_dir is not None:
        site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ledger.save(site.state_dir / LEDGER_FILE)


def plan_ledger(
    privacy_cfg: Mapping[str, Any], num_train: int, batch_size: int, epochs: int, rounds: int,
    max_epsilon: float | None, *, count_draw: float = 0.0, cap_delta: bool = False,
) -> PrivacyLedger:
    """A new site ledger: σ is fixed here once, for the whole planned run.

    With ``privacy.count_noise`` (the default) the site first releases its size as a noisy
    count ñ = n + count_noise · ``count_draw`` (a standard normal draw), charged to the ledger;
    q, the steps per round and σ are then computed from ñ, never from n. With
    ``target_epsilon`` σ is the smallest noise that keeps ε ≤ target after the count release and
    ``rounds × steps per round`` steps.
    """
    accountant = str(privacy_cfg.get("accountant", "prv"))
    count_noise = float(privacy_cfg["count_noise"]) if privacy_cfg.get("count_noise") else None
    released = noisy_count(num_train, count_noise, count_draw) if count_noise else None
    size = released or num_train
    # the default δ follows the released size too (it is reported); ``cap_delta``: a proposed
    # δ is never above it (a δ near 1 would make any ε meaningless)
    proposed = privacy_cfg.get("delta")
    delta = float(min(proposed, default_delta(size)) if proposed and cap_delta
                  else proposed or default_delta(size))
    sample_rate, steps = dp_schedule(size, batch_size, epochs)
    sigma = privacy_cfg.get("noise_multiplier")
    if sigma is None:
        sigma = noise_multiplier_for(
            float(privacy_cfg["target_epsilon"]), delta, sample_rate, rounds * steps,
            accountant=accountant, prefix=tuple(count_release_entries(count_noise)),
        )
    return PrivacyLedger(accountant=accountant, delta=delta, noise_multiplier=float(sigma),
                         sample_rate=sample_rate, max_epsilon=max_epsilon,
                         count_noise=count_noise, released_count=released)


def count_noise_draw(seed: int, secure: bool) -> float:
    """The standard normal draw behind ñ: seeded like the DP-SGD noise (same seed, same ñ), or
    from the OS CSPRNG when the site draws secure noise."""
    if secure:
        import random
        return random.SystemRandom().gauss(0.0, 1.0)
    import torch

    generator = torch.Generator().manual_seed(seed + 3)
    return float(torch.randn((), generator=generator))


def released_size(ledger: PrivacyLedger, num_train: int) -> int:
    """The training-set size everything the site sends is computed from: ñ, or n when the
    ledger releases exact counts (``count_noise`` null: a stated leak in the report)."""
    return ledger.released_count if ledger.released_count is not None else num_train


def train_private_round(
    model: torch.nn.Module, train: Dataset, config: LocalTrainingConfig, ledger: PrivacyLedger,
    privacy_cfg: Mapping[str, Any], *, seed: int, device: str,
    step_hook: StepHook | None = None,
) -> tuple[dict[str, float] | None, str | None]:
    """One round of DP-SGD charged to ``ledger``: ``(training metrics, None)``, or
    ``(None, why)`` when the round would take the ledger past its ``max_epsilon`` (the decline
    is recorded; nothing trains). The one place where a round's steps meet the accountant: the
    site and the simulation's baselines both train through it."""
    # q follows the released size (ñ, or n with exact counts); a changed q becomes a new
    # accountant entry.
    batches = math.ceil(released_size(ledger, len(train)) / config.batch_size)
    ledger.sample_rate, steps = dp_schedule(released_size(ledger, len(train)),
                                            config.batch_size, config.epochs)
    if ledger.exceeds_budget_after(steps):
        ledger.record_declined()
        return None, (f"would raise epsilon from {ledger.epsilon():.4g} to "
                      f"{ledger.epsilon_after(steps):.4g}, above this site's budget "
                      f"max_epsilon={ledger.max_epsilon:.4g}")
    dp = DPConfig(noise_multiplier=ledger.noise_multiplier,
                  max_grad_norm=float(privacy_cfg["max_grad_norm"]),
                  secure_noise=bool(privacy_cfg.get("secure_noise", False)),
                  batches=batches if ledger.released_count is not None else None)
    result = train_local(model, train, config, seed=seed, device=device, dp=dp,
                         step_hook=step_hook)
    if int(result["steps"]) != steps:  # the ledger must account for exactly what ran
        raise RuntimeError(f"DP-SGD ran {result['steps']} steps but {steps} were accounted")
    ledger.record_round(steps)
    return result, None

