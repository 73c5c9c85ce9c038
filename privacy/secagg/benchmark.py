"""Time every SecAgg stage on this machine (not a test).

    python -m privacy.secagg.benchmark                       # n = 10 sites, L = 100,000
    python -m privacy.secagg.benchmark --sites 20 --length 1000000 --degree 8 --drop 2

Prints, per stage, the time of all sites' work (summed: in a federation sites run in parallel,
so divide by n for one site's share) and the server's, the upload per site, and Shamir
split/reconstruct times for 101 holders (Flower 1.41's measured 4.2 s / 5.6 s in issue 5).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from privacy.secagg import messages as m
from privacy.secagg import shamir
from privacy.secagg.loopback import run_round
from privacy.secagg.server import setup


def time_shamir(num_holders: int = 101, repeats: int = 3) -> tuple[float, float]:
    """Seconds to split one 32-byte secret among ``num_holders`` (majority threshold) and to
    reconstruct all ``num_holders`` secrets of a round from a majority of holders each."""
    threshold = num_holders // 2 + 1
    holders = list(range(num_holders))
    split_times, combine_times = [], []
    for _ in range(repeats):
        shamir.lagrange_coefficients_at_zero.cache_clear()
        start = time.perf_counter()
        all_shares = [shamir.split(os.urandom(32), threshold, holders)
                      for _ in range(num_holders)]
        split_times.append((time.perf_counter() - start) / num_holders)
        start = time.perf_counter()
        for shares in all_shares:
            shamir.combine(shares, threshold, 32)
        combine_times.append(time.perf_counter() - start)
    return min(split_times), min(combine_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+ degree (None: full)")
    parser.add_argument("--drop", type=int, default=1, help="sites dropping after share-keys")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    plan = setup(args.sites, neighbours=args.degree, seed=args.seed)
    vectors = {i: rng.integers(0, 2**32, args.length, dtype=np.uint32)
               for i in range(args.sites)}
    dropped = set(range(args.sites - args.drop, args.sites))
    start = time.perf_counter()
    result = run_round(plan, vectors, dropouts={m.STAGE_MASKED_INPUT: dropped})
    wall = time.perf_counter() - start
    expected = np.zeros(args.length, dtype=np.uint32)
    for i in result.survivors:
        expected += vectors[i]
    assert np.array_equal(result.total, expected), "unmasked sum differs from the plaintext sum"
    print(f"SecAgg round: n={args.sites}, L={args.length:,}, t={plan.threshold}, "
          f"degree={len(plan.neighbours[0])}, {args.drop} dropped after share-keys; "
          f"exact sum OK; {wall:.3f} s in one process")
    print(f"{'stage':<16}{'all sites (s)':>14}{'per site (ms)':>15}{'server (s)':>12}")
    for stage in m.STAGES:
        sites = result.site_seconds.get(stage, 0.0)
        print(f"{stage:<16}{sites:>14.4f}{1e3 * sites / args.sites:>15.2f}"
              f"{result.server_seconds.get(stage, 0.0):>12.4f}")
    survivor = min(result.survivors)
    overhead = result.upload_bytes[survivor] - 4 * args.length
    print(f"upload of site {survivor}: {result.upload_bytes[survivor]:,} bytes = 4 B x "
          f"{args.length:,} (same as fp32) + {overhead:,} B of keys, ciphertexts and shares")
    split_s, combine_s = time_shamir()
    print(f"Shamir, 101 holders, t=51: split one secret {split_s * 1e3:.2f} ms, i.e. "
          f"{2 * split_s * 1e3:.2f} ms per site (b and s key), {2 * 101 * split_s:.3f} s for "
          f"all 101 sites; reconstruct 101 secrets {combine_s:.3f} s")


if __name__ == "__main__":
    main()
