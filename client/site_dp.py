"""The site's share of hospital-level DP (``privacy=site_dp``; docs/site_dp.md).

In the masked-input stage of secure aggregation (client/secure_aggregation.py) a site sends,
instead of its quantized delta, its clipped, rotated, rounded delta plus its OWN share of
discrete Gaussian noise (privacy/site_dp/encoding.py), so that the sum the server unmasks
already carries the planned noise. The site trusts the server with nothing here:

- it computes the plan itself from the public run settings (``hospital_privacy`` in
  privacy/run_settings.py: target ε, δ, clip, N, n, t, ring bits; the run's ``rounds``; the
  size of the model it received). The server never sends a noise level;
- its policy (client/policy.py ``hospital_privacy_refusal``) caps ε (``max_hospital_epsilon``);
- here, once the round's SecAgg parameters are known (the ones it signed with its keys), it
  refuses a plan counting on more survivors than secure aggregation guarantees: it signs a
  survivor set only with at least ``quorum(n, t)`` members (privacy/secagg/client.py), so the
  plan's threshold must not exceed that; and more participants than the plan's
  ``sites_per_round``, or more contributions than its ``rounds`` (counted in its own
  ``Context.state``, whatever round numbers the server sends); and, after its first
  contribution, any other plan (the ε of rounds noised for different plans would add up past
  each plan's target: ``rounds=1``, then ``rounds=2``, ... each within the count);
- across runs, a site with a ``state_dir`` keeps every noised contribution it ever made in
  ``hospital_privacy_ledger.json`` there (the worst-case RDP curve of each round, written
  before the share leaves) and refuses a round that would take the composition of all of them
  past ``max_hospital_epsilon`` (checked before training, and again under a lock when the
  round is charged, so two runs at once cannot both spend the same remainder): a server cannot
  reset the hospital-level budget by starting a new run (``Context.state`` above lives for one
  run only). Without ``max_hospital_epsilon`` the ledger only records: nothing caps ε across
  runs. A deployed site has a state_dir or refuses every run (client/policy.py);
- a deployed site draws its noise and rounding from the OS (ChaCha20 keyed by os.urandom);
  a simulated one from the run's seed unless ``secure_noise`` (reproducible runs).

Nothing else about the round leaves the site in the clear: no training loss, no example count,
not whether its delta was clipped (that bit is inside the noised sum, adaptive clipping).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from client.site import SiteSettings
from client.training import site_seed
from privacy import protocol
from privacy.files import write_atomically
from privacy.run_settings import HospitalPrivacySettings, RunSettings
from privacy.secagg import messages as secagg_messages
from privacy.secagg.client import quorum

if TYPE_CHECKING:  # privacy.site_dp loads scipy: only a site_dp round pays for it
    from privacy.site_dp import KeyStream, SiteDPPlan

LEDGER = "site-dp-contributions"  # Context.state key: this site's noised contributions so far
NOISE_LABEL = b"medsilo.site_dp.simulated-noise.v1"
LIFETIME_FILE = "hospital_privacy_ledger.json"  # in state_dir: every contribution, every run
LIFETIME_VERSION = 1

log = logging.getLogger(__name__)


class ChargeRefused(RuntimeError):
    """The state_dir ledger will not take this contribution: the share must not leave."""


@functools.lru_cache(maxsize=8)
def site_plan(hospital: HospitalPrivacySettings, rounds: int, dim: int) -> SiteDPPlan:
    """The plan, computed at the site from public values (cached: the same every round)."""
    return hospital.plan(rounds=rounds, dim=dim)


def round_refusal(hospital: HospitalPrivacySettings, settings: RunSettings,
                  secagg_state: Mapping[str, Any], contributed: int,
                  pinned: str | None = None) -> str | None:
    """Why this site will not add its share to this round's sum, or None. ``pinned``: the
    plan of its earlier contributions in this run (:func:`pinned_plan`)."""
    if pinned is not None and pinned != plan_inputs(hospital, settings.rounds):
        return ("the run's hospital-level plan (hospital_privacy, rounds) is not the one this "
                f"site already contributed under: {pinned}")
    participants = int(secagg_state[secagg_messages.NUM_PARTICIPANTS])
    secagg_threshold = int(secagg_state[secagg_messages.THRESHOLD])
    floor = quorum(participants, secagg_threshold)
    if hospital.threshold > floor:
        return (f"hospital_privacy.threshold {hospital.threshold} is above the fewest survivors "
                f"secure aggregation releases a sum of in this round ({floor}: max(threshold "
                f"{secagg_threshold}, {participants}//2 + 1), the survivor sets this site "
                "signs): its noise share would be planned for more sites than the sum may have")
    if participants > hospital.sites_per_round:
        return (f"{participants} sites take part in this round, more than the "
                f"hospital_privacy.sites_per_round {hospital.sites_per_round} the plan is for")
    if settings.server_round > settings.rounds or contributed >= settings.rounds:
        return (f"this site already contributed to {contributed} of the {settings.rounds} "
                f"rounds the hospital-level plan covers (round {settings.server_round} asked)")
    return None


def contributions(state: Mapping[str, Any]) -> int:
    return int(dict(state[LEDGER])["rounds"]) if LEDGER in state else 0


def plan_inputs(hospital: HospitalPrivacySettings, rounds: int) -> str:
    """The public values the plan is computed from, as one comparable string."""
    return json.dumps({**hospital.as_dict(), "rounds": rounds}, sort_keys=True)


def pinned_plan(state: Mapping[str, Any]) -> str | None:
    """The plan inputs of this site's first contribution in this run, or None before it."""
    return str(dict(state[LEDGER])["plan"]) if LEDGER in state else None


def record_contribution(state: RecordDict, settings: RunSettings) -> None:
    """Count one more noised contribution, under the plan it was noised for."""
    assert settings.hospital_privacy is not None
    state[LEDGER] = ConfigRecord({
        "rounds": contributions(state) + 1,
        "plan": plan_inputs(settings.hospital_privacy, settings.rounds)})


def noise_stream(site: SiteSettings, settings: RunSettings) -> KeyStream:
    """OS randomness for a deployed site (or ``secure_noise``); the run's seed in simulation."""
    from privacy.site_dp import KeyStream

    assert settings.hospital_privacy is not None
    if not site.simulated or settings.hospital_privacy.secure_noise:
        return KeyStream()
    seed = site_seed(settings.seed, site.site_id, settings.server_round)
    return KeyStream(hashlib.sha256(NOISE_LABEL + seed.to_bytes(8, "big")).digest())


def encode_share(delta: Sequence[np.ndarray], site: SiteSettings, settings: RunSettings,
                 round_clip: float | None) -> tuple[np.ndarray, SiteDPPlan]:
    """This site's noised share of the round's sum (uint32, for SecAgg to mask) and its plan."""
    from privacy.site_dp import encode_site_delta

    hospital = settings.hospital_privacy
    assert hospital is not None
    dim = int(sum(np.asarray(d).size for d in delta))
    plan = site_plan(hospital, settings.rounds, dim)
    encoding = encode_site_delta(
        delta, plan, rotation_seed=protocol.site_dp_rotation_seed(settings.seed,
                                                                  settings.server_round),
        noise_stream=noise_stream(site, settings), clip=round_clip if plan.adaptive else None)
    return encoding.vector, plan


# ---------------------------------------------------------------- across runs (state_dir)

@functools.lru_cache(maxsize=8)
def worst_round_rdp(plan: SiteDPPlan) -> tuple[float, ...]:
    """RDP curve of one round of ``plan`` with ANY number of survivors in [t, n] (the site
    cannot know how many sums its share ends up in): what a contribution is charged."""
    from privacy.site_dp.accounting import round_rdp

    rdp = round_rdp(plan, plan.threshold, tau_survivors=plan.sites_per_round)
    return tuple(float(v) for v in rdp)


def lifetime_path(site: SiteSettings):
    return None if site.state_dir is None else site.state_dir / LIFETIME_FILE


def load_lifetime(site: SiteSettings) -> list[dict[str, Any]]:
    """Every noised contribution this site recorded (oldest first); [] without a state_dir or
    before the first. A file that is not what this module writes is an error naming it."""
    from privacy.site_dp.accounting import RDP_ORDERS

    path = lifetime_path(site)
    if path is None or not path.is_file():
        return []
    expected = (f"expected {{\"version\": {LIFETIME_VERSION}, \"orders\": [...], "
                "\"contributions\": [{\"run_id\", \"round\", \"delta\", \"rdp\"}, ...]}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable as JSON ({err}); {expected}") from err
    if not isinstance(data, dict) or data.get("version") != LIFETIME_VERSION:
        raise ValueError(f"{path}: unknown format; {expected}")
    if data.get("orders") != [int(a) for a in RDP_ORDERS]:
        raise ValueError(f"{path}: RDP orders differ from this version's "
                         f"({int(RDP_ORDERS[0])}..{int(RDP_ORDERS[-1])}); {expected}")
    entries = data.get("contributions")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: no contributions list; {expected}")
    for number, entry in enumerate(entries, 1):
        rdp = entry.get("rdp") if isinstance(entry, dict) else None
        delta = entry.get("delta") if isinstance(entry, dict) else None
        if not (isinstance(rdp, list) and len(rdp) == len(RDP_ORDERS)
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                        for v in rdp)
                and isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"{path}: contribution {number} needs a delta in (0, 1) and "
                             f"{len(RDP_ORDERS)} finite non-negative RDP values; {expected}")
    return entries


def lifetime_epsilon(entries: Sequence[Mapping[str, Any]],
                     extra: SiteDPPlan | None = None) -> tuple[float, float] | None:
    """(ε, δ) of all ``entries`` composed (plus one more round of ``extra``), at the smallest
    δ any of them was planned for; None when there is nothing."""
    from privacy.site_dp.accounting import RDP_ORDERS, rdp_to_epsilon

    curves = [np.asarray(e["rdp"], dtype=np.float64) for e in entries]
    deltas = [float(e["delta"]) for e in entries]
    if extra is not None:
        curves.append(np.asarray(worst_round_rdp(extra)))
        deltas.append(extra.delta)
    if not curves:
        return None
    delta = min(deltas)
    return rdp_to_epsilon(RDP_ORDERS, np.sum(curves, axis=0), delta)[0], delta


def lifetime_refusal(site: SiteSettings, plan: SiteDPPlan) -> str | None:
    """Why one more round of ``plan`` would take this site past its hospital-level budget over
    ALL runs (its ``state_dir`` ledger), or None."""
    try:
        entries = load_lifetime(site)
    except ValueError as err:  # never contribute on top of a ledger it cannot read
        return f"this site's hospital-level privacy ledger is unusable: {err}"
    return _cap_refusal(site, entries, plan)


def _cap_refusal(site: SiteSettings, entries: Sequence[Mapping[str, Any]],
                 plan: SiteDPPlan) -> str | None:
    cap = site.max_hospital_epsilon
    if cap is None:
        return None
    after = lifetime_epsilon(entries, plan)
    assert after is not None
    if after[0] > cap * (1 + 1e-9):
        return (f"one more noised contribution would bring this site's hospital-level epsilon "
                f"over all runs to {after[0]:.3g} (delta {after[1]:g}; {len(entries)} earlier "
                f"contributions in {LIFETIME_FILE}), above its max_hospital_epsilon {cap:g}")
    return None


def record_lifetime(site: SiteSettings, settings: RunSettings, plan: SiteDPPlan,
                    run_id: int) -> float | None:
    """Add this round's contribution to the state_dir ledger (before the share leaves); the
    site's hospital-level ε over all runs after it, or None without a state_dir.

    Read, checked against ``max_hospital_epsilon`` and rewritten under an exclusive lock on
    the state_dir: the check in :func:`lifetime_refusal` ran before training, and another run
    at the same site (a server may start two at once) may have charged the ledger since. Over
    the cap now, it raises :class:`ChargeRefused`: the share never leaves (the handler replies
    with a refusal naming the reason).
    """
    import fcntl

    from privacy.site_dp.accounting import RDP_ORDERS

    path = lifetime_path(site)
    if path is None:  # simulation only: policy refuses a deployed site without a state_dir
        if not site.simulated:
            raise ChargeRefused("a deployed site needs a state_dir to keep its hospital-level "
                               "privacy ledger across runs; set state_dir")
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{LIFETIME_FILE}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = load_lifetime(site)
        if (reason := _cap_refusal(site, entries, plan)) is not None:
            raise ChargeRefused(reason)
        entries.append({"run_id": int(run_id), "round": int(settings.server_round),
                        "plan": plan_inputs(settings.hospital_privacy, settings.rounds)
                        if settings.hospital_privacy is not None else None,
                        "delta": plan.delta, "rdp": list(worst_round_rdp(plan))})
        data = {"version": LIFETIME_VERSION, "orders": [int(a) for a in RDP_ORDERS],
                "contributions": entries}
        write_atomically(path, json.dumps(data).encode("utf-8"), mode=0o600)
    finally:
        os.close(lock)  # releases the lock
    eps, delta = lifetime_epsilon(entries)
    log.info("hospital-level epsilon over all runs at this site: %.4g (delta %g, %d "
             "contributions)", eps, delta, len(entries))
    return eps
