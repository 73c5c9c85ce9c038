"""The server's side of hospital-level DP (``privacy=site_dp``; docs/site_dp.md).

Secure aggregation (server/secure_aggregation.py) unmasks the SUM of the survivors' noised
shares; this module reads it: the plan (the same public function of the run settings the sites
evaluate themselves, client/site_dp.py), the round's public clip (adaptive clipping, Andrew et
al. 2021: updated here from the noisy count that travels in the same sum), the decoded
UNWEIGHTED mean of the survivors' clipped deltas (DP-FedAvg, McMahan et al. 2018: every
hospital counts once; weighting by example count would need its own sensitivity analysis),
and the hospital-level ledger: ε of the survivors actually summed in each round
(``privacy.site_dp.epsilon``) and what dropouts did to the noise (``noise_report``).

The server never adds or chooses noise: it cannot see an un-noised sum, and the ledger is what
the sites' own plan implies for the rounds that were released.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy import protocol
from privacy.secagg import SecAggAborted
from privacy.secagg.update import split_by_shapes
from server.history import RunHistory
from server.settings import ConfigError, hospital_settings

if TYPE_CHECKING:  # privacy.site_dp loads scipy: a server without site_dp does not pay for it
    from privacy.site_dp import SiteDPPlan

MECHANISM = ("distributed discrete Gaussian inside secure aggregation (Kairouz, Liu, Steinke "
             "2021): each site adds its own noise share before masking")
ADJACENCY = "zero-out of one hospital's update (in every round, while it still adds its noise)"
AMPLIFICATION = ("none: the server chooses and sees each round's cohort, so sampling of sites "
                 "is not counted as hiding anyone")
MEAN = "unweighted mean of the survivors' clipped deltas (DP-FedAvg): every hospital counts once"


class HospitalPrivacy:
    """Plan, round clip, decoding and ledger of one run (one object for all rounds)."""

    def __init__(self, cfg: Mapping[str, Any], dim: int,
                 history: RunHistory | None = None) -> None:
        settings = hospital_settings(cfg)
        if settings is None:
            raise ValueError("HospitalPrivacy needs a configuration with privacy=site_dp")
        hospital = cfg["hospital_privacy"]
        self.settings = settings
        self.rounds = int(cfg["rounds"])
        self.seed = int(cfg["seed"])
        self.record_level = str(hospital.get("record_level", "off"))
        self.target_quantile = float(hospital.get("target_quantile", 0.5))
        self.clip_learning_rate = float(hospital.get("clip_learning_rate", 0.2))
        try:
            self.plan: SiteDPPlan = settings.plan(rounds=self.rounds, dim=dim)
        except ValueError as err:
            raise ConfigError(f"privacy=site_dp cannot be planned for this model ({dim} "
                              f"parameters): {err}") from err
        self.round_clip = self.plan.clip
        self.released: list[int] = []  # survivors of each released round (the console's ε)
        for record in _site_dp_records(history):  # resumed: the clip the last round chose
            self.round_clip = float(record.get("next_clip", self.round_clip))
            self.released.append(int(record["survivors"]))

    # -- what secure aggregation needs ---------------------------------------------------
    def public_fields(self) -> dict[str, Any]:
        """Sent with the round's keys: the round's clip (adaptive clipping only)."""
        return {protocol.SITE_DP_CLIP: self.round_clip} if self.plan.adaptive else {}

    def secagg_threshold(self, configured: int | None, participants: int,
                         neighbours: int | None) -> int | None:
        """The SecAgg threshold t for a round of ``participants``: the sites sign survivor sets
        of at least quorum(p, t) = max(t, p//2 + 1) members only, and refuse a plan counting on
        more (client/site_dp.py). When fewer sites than planned take part (a refusal or a lost
        site before the keys), full SecAgg raises t to the plan's threshold so the round can
        still go ahead; SecAgg+ keeps its per-neighbourhood t (its sites may then refuse)."""
        needed = self.plan.threshold
        if participants < needed:
            raise SecAggAborted("advertise-keys", f"{participants} sites take part, fewer than "
                                f"the {needed} survivors the hospital-level noise is planned "
                                "for (privacy.threshold)", required=needed,
                                available=participants)
        if neighbours is not None and neighbours < participants - 1:
            return configured
        return max(configured or 0, participants // 2 + 1, needed)

    @property
    def vector_length(self) -> int:
        return self.plan.vector_length

    def decode(self, total: np.ndarray, survivors: int, server_round: int,
               shapes: Sequence[tuple[int, ...]]) -> tuple[list[np.ndarray], dict[str, Any]]:
        """The noisy unweighted mean delta (one array per shape) and the round's record."""
        from privacy.site_dp import (
            decode_mean,
            decode_unclipped_fraction,
            epsilon,
            next_clip,
            noise_report,
        )

        clip = self.round_clip if self.plan.adaptive else None
        mean = decode_mean(total, self.plan,
                           rotation_seed=protocol.site_dp_rotation_seed(self.seed, server_round),
                           survivors=survivors, clip=clip)
        self.released.append(survivors)
        record: dict[str, Any] = {"survivors": survivors, "clip": self.round_clip,
                                  "noise": noise_report(self.plan, survivors),
                                  # after this round (an aborted round releases nothing)
                                  "epsilon_after": epsilon(self.plan, self.released)}
        if self.plan.adaptive:  # post-processing of the same noised sum
            fraction = decode_unclipped_fraction(total, self.plan, survivors=survivors)
            self.round_clip = next_clip(self.round_clip, fraction,
                                        target_quantile=self.target_quantile,
                                        learning_rate=self.clip_learning_rate)
            record.update(unclipped_fraction=fraction, next_clip=self.round_clip)
        return split_by_shapes(mean, shapes), record

    # -- the report ------------------------------------------------------------------------
    def section(self, history: RunHistory) -> dict[str, Any]:
        """report.json ``hospital_privacy``: the plan, ε spent, and every round's noise."""
        from privacy.site_dp import epsilon

        plan, rounds, released = self.plan, [], []
        for number in sorted(history.rounds):
            secure = history.rounds[number].secure_aggregation or {}
            record = secure.get("site_dp")
            survivors = int(record["survivors"]) if record else 0  # aborted: nothing released
            released.append(survivors)
            entry: dict[str, Any] = {"round": number, "survivors": survivors,
                                     "epsilon_after": epsilon(plan, released)}
            if record:
                entry.update({k: v for k, v in record.items() if k != "survivors"})
            else:
                entry["released"] = False
            rounds.append(entry)
        spent = epsilon(plan, released)
        noised = [r for r in rounds if "noise" in r]
        removed = max((r["noise"]["variance_removed_by_dropouts"] for r in noised), default=0.0)
        return {
            "dp": True,
            "mechanism": MECHANISM,
            "unit": "one hospital: everything it contributes to the model over the whole run",
            "adjacency": ADJACENCY,
            "amplification": AMPLIFICATION,
            "mean": MEAN,
            "target_epsilon": plan.target_epsilon,
            "planned_epsilon": plan.planned_epsilon,
            "epsilon": spent,
            "delta": plan.delta,
            "threshold": plan.threshold,
            "sites_per_round": plan.sites_per_round,
            "num_sites": plan.num_sites,
            "rounds_planned": plan.rounds,
            "rounds_released": sum(1 for s in released if s),
            "clip": plan.clip,
            "adaptive_clipping": plan.adaptive,
            "dim": plan.dim,
            "bits": plan.bits,
            "scale": plan.scale,
            "noise_sigma_squared_per_site": plan.noise.sigma_squared,
            "planned_sum_std": plan.central_std(plan.threshold),
            "wrap_probability": plan.wrap_probability,
            "record_level": self.record_level,
            "noise_removed_by_dropouts": (
                f"the noise of the sites that dropped: at most {removed:.0%} of the full cohort's "
                "noise variance in a round; each round still had at least the threshold of "
                f"{plan.threshold} survivors the noise is planned for, so ε stays within the plan"
                if removed else "none: every asked site's share reached the sum"),
            "trusted": ("every surviving site adds its own noise share (its approved code) and "
                        "secure aggregation releases only sums of at least the threshold of "
                        "sites; the server is not trusted with noise and never sees an un-noised "
                        "sum (docs/threat_model.md)"),
            "rounds": rounds,
        }


def _site_dp_records(history: RunHistory | None) -> list[dict[str, Any]]:
    if history is None:
        return []
    return [r.secure_aggregation["site_dp"] for _, r in sorted(history.rounds.items())
            if r.secure_aggregation and r.secure_aggregation.get("site_dp")]
