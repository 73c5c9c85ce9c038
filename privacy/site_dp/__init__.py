"""Hospital-level differential privacy with distributed noise (issue 20, the core math).

Each sampled site clips its model delta, rotates and rounds it into the secure-aggregation ring
and adds its own share of discrete Gaussian noise, so the sum the server unmasks already carries
the planned noise and no party ever sees an un-noised sum (Kairouz, Liu, Steinke 2021).

- :mod:`accounting` — ``plan(...)`` (per-site noise and encoding for a target ε, δ) and
  ``epsilon(plan, survivors_per_round)`` for hospital-level (zero-out one site) adjacency;
- :mod:`encoding` — ``encode_site_delta`` (site) and ``decode_mean`` (server);
- :mod:`clipping` — ``next_clip``: adaptive clipping's update from the noisy unclipped share;
- :mod:`discrete_gaussian` — the exact Canonne–Kamath–Steinke sampler;
- :mod:`randomness` — exact uniform integers from a ChaCha20 keystream.

Nothing here imports torch, Flower or the rest of medsilo: the integration (client/, server/,
simulations/) plugs it into privacy/secagg. Design note: docs/site_dp.md.
"""

from privacy.site_dp.accounting import (
    SiteDPPlan,
    epsilon,
    noise_report,
    plan,
    worst_case_epsilon,
)
from privacy.site_dp.clipping import next_clip
from privacy.site_dp.discrete_gaussian import DiscreteGaussian
from privacy.site_dp.encoding import (
    SiteEncoding,
    decode_mean,
    decode_sum,
    decode_unclipped_fraction,
    encode_site_delta,
)
from privacy.site_dp.randomness import KeyStream

__all__ = [
    "DiscreteGaussian",
    "KeyStream",
    "SiteDPPlan",
    "SiteEncoding",
    "decode_mean",
    "decode_sum",
    "decode_unclipped_fraction",
    "encode_site_delta",
    "epsilon",
    "next_clip",
    "noise_report",
    "plan",
    "worst_case_epsilon",
]
