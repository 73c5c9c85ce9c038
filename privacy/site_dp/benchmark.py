"""Cost of hospital-level DP encoding against plain secure-aggregation quantization.

``python -m privacy.site_dp.benchmark [--num-params 1000000] [--repeats 5]``

Per repeat, in the same process and interleaved (A, B, A, B, ...), so that load on a shared
machine hits both alike: a site's encoding (site_dp: clip, rotate, round, exact discrete
Gaussian noise; plain: privacy/secagg/update.py's per-coordinate clip + stochastic rounding)
and the server's decoding of the sum. The first call of each (imports warm, buffers cold) is
reported apart as start-up; steady state is the median and min of the repeats after it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from privacy.secagg import update as plain
from privacy.site_dp import accounting, encoding
from privacy.site_dp.randomness import KeyStream


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(num_params: int = 1_000_000, repeats: int = 5, sites: int = 20) -> dict[str, dict]:
    """Seconds per call, {name: {"first", "median", "min"}}, plus the plan's own cost."""
    rng = np.random.default_rng(0)
    delta = rng.normal(size=num_params) * 1e-3
    start = time.perf_counter()
    plan = accounting.plan(target_epsilon=3.0, delta=1e-5, clip=1.0, dim=num_params,
                           num_sites=100, sites_per_round=sites, threshold=sites // 2 + 1,
                           rounds=10)
    plan_seconds = time.perf_counter() - start
    seed = b"benchmark-round"
    dp_vector = encoding.encode_site_delta(delta, plan, rotation_seed=seed).vector
    plain_vector, _ = plain.encode_update([delta], 1.0, clip=0.05, num_sites=sites, rng=0)
    calls: dict[str, Callable[[], object]] = {
        "site_dp encode": lambda: encoding.encode_site_delta(delta, plan, rotation_seed=seed),
        "plain encode": lambda: plain.encode_update([delta], 1.0, clip=0.05, num_sites=sites,
                                                    rng=1),
        "site_dp decode": lambda: encoding.decode_mean(dp_vector, plan, rotation_seed=seed,
                                                       survivors=plan.threshold),
        "plain decode": lambda: plain.decode_mean(plain_vector, [(num_params,)], clip=0.05,
                                                  num_sites=sites, num_summed=1),
        "discrete Gaussian noise only": lambda: plan.noise.sample(plan.padded_dim, KeyStream()),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats + 1):  # round 0 = start-up
        for name, call in calls.items():
            samples[name].append(_timed(call))
        del round_index
    results = {name: {"first": times[0], "median": statistics.median(times[1:]),
                      "min": min(times[1:])} for name, times in samples.items()}
    results["plan"] = {"first": plan_seconds, "median": plan_seconds, "min": plan_seconds}
    print(f"{num_params:,} parameters (padded to {plan.padded_dim:,}), {sites} sites per round, "
          f"{repeats} interleaved repeats after a start-up call")
    print(f"{'':32s} {'start-up':>9s} {'median':>9s} {'min':>9s}   seconds")
    for name, row in results.items():
        print(f"{name:32s} {row['first']:9.3f} {row['median']:9.3f} {row['min']:9.3f}")
    for what in ("encode", "decode"):
        dp, base = results[f"site_dp {what}"], results[f"plain {what}"]
        print(f"ratio site_dp / plain {what}: median {dp['median'] / base['median']:.1f}x, "
              f"min {dp['min'] / base['min']:.1f}x")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, default=20)
    arguments = parser.parse_args()
    run(arguments.num_params, arguments.repeats, arguments.sites)
