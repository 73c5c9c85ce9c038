"""The site's privacy ledger: where it is kept, how σ is planned, and the budget check.

The ledger lives in ``Context.state`` (it survives rounds in simulation and deployment) and,
when the site has a state directory, in a file there (it survives a SuperNode restart). The
file wins: it is written after every round, atomically. A ledger is never reset by the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context

from client.site import SiteSettings
from client.training import dp_schedule
from privacy.accounting import PrivacyLedger, default_delta, noise_multiplier_for

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
        site.state_dir.mkdir(parents=True, exist_ok=True)
        ledger.save(site.state_dir / LEDGER_FILE)


def plan_ledger(
    privacy_cfg: Mapping[str, Any], num_train: int, batch_size: int, epochs: int, rounds: int,
    max_epsilon: float | None,
) -> PrivacyLedger:
    """A new site ledger: σ is fixed here once, for the whole planned run.

    With ``target_epsilon`` σ is the smallest noise that keeps ε ≤ target after
    ``rounds × steps per round`` steps at this site's own sample rate.
    """
    sample_rate, steps = dp_schedule(num_train, batch_size, epochs)
    accountant = str(privacy_cfg.get("accountant", "prv"))
    delta = privacy_cfg.get("delta") or default_delta(num_train)
    sigma = privacy_cfg.get("noise_multiplier")
    if sigma is None:
        sigma = noise_multiplier_for(
            float(privacy_cfg["target_epsilon"]), float(delta), sample_rate, rounds * steps,
            accountant=accountant,
        )
    return PrivacyLedger(
        accountant=accountant, delta=float(delta), noise_multiplier=float(sigma),
        sample_rate=sample_rate, max_epsilon=max_epsilon,
    )


def site_budget(site: SiteSettings, privacy_cfg: Mapping[str, Any]) -> float | None:
    """The site's own ``max-epsilon`` wins over ``privacy.max_epsilon`` sent by the server."""
    if site.max_epsilon is not None:
        return site.max_epsilon
    value = privacy_cfg.get("max_epsilon")
    return float(value) if value is not None else None
