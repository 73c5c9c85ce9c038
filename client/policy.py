"""The site's policy: what a run must promise before this hospital reads a single record.

The server proposes a run (task, model, privacy settings travel in every message); the site
disposes. Its own settings (``client/site.py``: site.toml in deployment, ``site.<key>=...`` in
simulation) win, and a run that asks for less is refused with a reason the server reports:

- the app version must be one the site approved (``client/approval.py``), the task the site's
  (``task`` / ``allowed_tasks``), the model one it allows (``allowed_models``);
- a deployed site keeps its privacy ledger and egress log in a writable ``state_dir``, or it
  does not take part (fail closed: without it, ε would restart at 0 after a restart);
- ``require_dp``: a run without DP-SGD is refused;
- under DP: σ at least ``min_noise_multiplier`` (an explicit smaller σ is refused; a planned σ
  is raised to the floor), C inside ``max_grad_norm_range``, the site's size released only as a
  noisy count (``count_noise`` >= 1), a known accountant, δ < 1. The site plans σ itself, from
  its own budget: a server's ``target_epsilon`` above the site's ``max_epsilon`` is lowered to it;
  a deployed site draws its DP noise, Poisson batches and noisy count from the OS, never from the
  run's seed (which the server chose and could replay);
- under hospital-level DP (privacy=site_dp): a planned epsilon at most ``max_hospital_epsilon``,
  a delta below 1/num_sites, and (client/site_dp.py) a threshold of survivors no larger than
  the SecAgg floor the site itself enforces, at most ``rounds`` contributions, one plan a run;
  and, with a ``state_dir``, ``max_hospital_epsilon`` over ALL runs: every noised contribution
  is charged to ``hospital_privacy_ledger.json`` there and a round that would take the
  composition past the cap is refused (client/site_dp.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from client.approval import approval_refusal
from client.site import SiteSettings
from privacy.accounting import ACCOUNTANTS
from privacy.run_settings import HospitalPrivacySettings, PrivacySettings, RunSettings

PRIVACY_MODES = ("off", "dp")
MIN_COUNT_NOISE = 1.0  # the smallest count noise (std, in examples) a DP site accepts


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def state_dir_refusal(site: SiteSettings) -> str | None:
    """A deployed site without a writable state directory refuses every run."""
    if site.simulated:
        return None
    if site.state_dir is None:
        return ("this site has no state_dir: its privacy ledger and egress log would not "
                "survive a restart; set state_dir in its site configuration")
    try:
        site.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return "this site's state_dir cannot be created; fix its permissions"
    if not os.access(site.state_dir, os.W_OK | os.X_OK):
        return "this site's state_dir is not writable; fix its permissions"
    return None


def privacy_refusal(site: SiteSettings, privacy: PrivacySettings) -> str | None:
    """Why the run's privacy settings fall short of this site's policy, or None."""
    mode = privacy.name
    if mode not in PRIVACY_MODES:
        return f"unknown privacy mode {mode!r}; this site knows {list(PRIVACY_MODES)}"
    if mode == "off":
        if site.require_dp:
            return "this site requires DP-SGD (require_dp); the run asks for privacy=off"
        return None
    sigma = privacy.noise_multiplier
    if sigma is None and not _positive(privacy.target_epsilon):
        return "the run sets neither a noise multiplier nor a positive target epsilon"
    if sigma is not None and not _positive(sigma):
        return f"noise multiplier must be positive, the run asks for {sigma!r}"
    floor = site.min_noise_multiplier
    if sigma is not None and floor is not None and sigma < floor:
        return (f"the run asks for noise multiplier {sigma:g}, below this site's "
                f"min_noise_multiplier {floor:g}")
    clip = privacy.max_grad_norm
    if not _positive(clip):
        return f"max_grad_norm must be positive, the run asks for {clip!r}"
    if site.max_grad_norm_range is not None:
        low, high = site.max_grad_norm_range
        if not low <= clip <= high:
            return (f"the run asks for max_grad_norm {clip:g}, outside this site's "
                    f"max_grad_norm_range [{low:g}, {high:g}]")
    if privacy.accountant not in ACCOUNTANTS:
        return f"unknown accountant {privacy.accountant!r}; expected one of {ACCOUNTANTS}"
    count_noise = privacy.count_noise
    if not _positive(count_noise) or count_noise < MIN_COUNT_NOISE:
        return (f"this site releases its size only as a noisy count: privacy.count_noise must "
                f"be >= {MIN_COUNT_NOISE:g}, the run asks for {count_noise!r}")
    delta = privacy.delta
    if delta is not None and not (_positive(delta) and delta < 1):
        return f"delta must be in (0, 1), the run asks for {delta!r}"
    return None


def refusal_reason(site: SiteSettings, settings: RunSettings) -> str | None:
    """Why this site will not run this message, or ``None``: checked before any data is read."""
    reason = approval_refusal(site.require_approval, site.approved_app_hashes)
    if reason is not None:
        return reason
    if (reason := state_dir_refusal(site)) is not None:
        return reason
    task = settings.task.get("name")
    if site.task is not None and task != site.task:
        return f"this site's data is for task {site.task!r}; the run asks for task {task!r}"
    if site.allowed_tasks and task not in site.allowed_tasks:
        return f"task {task!r} is not among this site's allowed_tasks {list(site.allowed_tasks)}"
    model = settings.model.get("name")
    if site.allowed_models and model not in site.allowed_models:
        return (f"model {model!r} is not among this site's allowed_models "
                f"{list(site.allowed_models)}")
    reason = privacy_refusal(site, settings.privacy)
    if reason is None and settings.hospital_privacy is not None:
        reason = hospital_privacy_refusal(site, settings.hospital_privacy)
    elif reason is None and site.max_hospital_epsilon is not None:
        # a site with a hospital-level budget takes part only under hospital-level DP
        reason = (f"this site requires hospital-level DP (max_hospital_epsilon "
                  f"{site.max_hospital_epsilon:g}); the run has none (privacy=site_dp)")
    if reason is None and site.require_dp and settings.task.get("standardize") == "site":
        # features fitted to the site's own training records: outside the DP guarantee
        reason = ("this site requires DP-SGD (require_dp); task.standardize=site fits the "
                  "features to its training records, outside the DP guarantee")
    return reason


def hospital_privacy_refusal(site: SiteSettings, hospital: HospitalPrivacySettings
                             ) -> str | None:
    """Why the run's hospital-level DP (privacy=site_dp) falls short of this site's policy, or
    None. The site never takes a noise level from the server: it plans its noise share from
    these public values itself (client/site_dp.py), so it only has to refuse values that would
    plan too little: an epsilon above its own cap, a delta that is no guarantee for a
    federation of this size, a threshold of survivors the SecAgg floor does not back (checked
    once the round's SecAgg parameters are known: client/site_dp.py)."""
    eps = hospital.target_epsilon
    if not _positive(eps):
        return f"hospital_privacy.target_epsilon must be positive, the run asks for {eps!r}"
    cap = site.max_hospital_epsilon
    if cap is not None and eps > cap:
        return (f"the run plans hospital-level epsilon {eps:g} (hospital_privacy.target_epsilon)"
                f", above this site's max_hospital_epsilon {cap:g}")
    if not _positive(hospital.clip):
        return f"hospital_privacy.clip must be positive, the run asks for {hospital.clip!r}"
    if hospital.num_sites < 1 or not 1 <= hospital.threshold <= hospital.sites_per_round \
            or hospital.sites_per_round > hospital.num_sites:
        return ("hospital_privacy needs 1 <= threshold <= sites_per_round <= num_sites, the run "
                f"asks for {hospital.threshold}, {hospital.sites_per_round}, "
                f"{hospital.num_sites}")
    delta = hospital.delta
    if not (_positive(delta) and delta < 1 / hospital.num_sites):
        return (f"hospital_privacy.delta must be in (0, 1/num_sites = "
                f"{1 / hospital.num_sites:.3g}) for a guarantee per hospital, the run asks for "
                f"{delta!r}")
    if delta > site.max_hospital_delta:
        return (f"hospital_privacy.delta {delta:g} is above this site's max_hospital_delta "
                f"{site.max_hospital_delta:g}")
    if not 2 <= hospital.bits <= 32:
        return f"hospital_privacy.bits must be in [2, 32], the run asks for {hospital.bits}"
    sigma_b = hospital.count_noise_std
    if sigma_b is not None and not _positive(sigma_b):
        return f"hospital_privacy.count_noise_std must be positive, the run asks for {sigma_b!r}"
    return None


def site_privacy(site: SiteSettings, privacy: PrivacySettings) -> dict[str, Any]:
    """The privacy settings this site enforces: its own δ, and a target ε no larger than its
    own budget (it plans σ from its budget, whatever the server proposes)."""
    effective = privacy.as_dict()
    if site.delta is not None:  # the site's own δ wins over the server's
        effective["delta"] = site.delta
    if not site.simulated:
        # The run's seed comes from the server: noise, Poisson batches and the noisy count
        # drawn from it could be reproduced there and subtracted. A deployed site draws them
        # from the OS whatever the server asks (simulations keep the seed: reproducibility).
        effective["secure_noise"] = True
    target = effective.get("target_epsilon")
    if site.max_epsilon is not None and target is not None and target > site.max_epsilon:
        effective["target_epsilon"] = site.max_epsilon
    return effective


def apply_noise_floor(site: SiteSettings, sigma: float) -> float:
    """A planned σ is never below the site's ``min_noise_multiplier``."""
    floor = site.min_noise_multiplier
    return max(sigma, floor) if floor is not None else sigma


def enforced_budget(site: SiteSettings, privacy: Mapping[str, Any],
                    current: float | None, *, planning: bool) -> float | None:
    """The ε budget this DP round runs under (``current``: the one in the site's ledger).

    The site's own ``max_epsilon`` wins. Without it, a simulated site takes the server's
    ``max_epsilon`` as before. A deployed site fixes, when it plans σ, the tighter of the
    server's ``max_epsilon`` and the target σ was planned for; later rounds can only lower it:
    a server cannot plan σ for few rounds and then run many, nor raise the budget later.
    """
    if site.max_epsilon is not None:
        return site.max_epsilon
    proposed = privacy.get("max_epsilon")
    if site.simulated:
        return float(proposed) if proposed is not None else None
    bounds = [proposed, privacy.get("target_epsilon") if planning else current]
    known = [float(b) for b in bounds if b is not None]
    return min(known) if known else None
