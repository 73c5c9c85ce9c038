"""How tight and how costly the privacy audit is (issue 7's benchmark).

    python -m simulations.benchmarks.audit [--epsilons 2 4 8] [--seeds 1] [--canaries 1000]
        [--steps 300] [--federated [dp off]] [--json PATH]

(a) Tightness: the white-box one-run audit (``simulations/audit/dp_sgd.py``: Dirac gradient
canaries in Opacus's per-sample gradients of a linear model, the same injection the federated
audit does at its auditing site) against honest DP-SGD calibrated by Opacus
(``privacy.accounting.noise_multiplier_for``, as a site plans σ: Opacus's
``get_noise_multiplier`` with the PRV accountant) to each target ε at the audit's own q and steps.
Prints ε_lb / ε per ε. Reference: Steinke, Nasr, Jagielski (2023) reach about 0.45 of the
accountant's ε in an idealized white-box CIFAR-like setting; a one-run audit with m canaries is
also capped (every guess right, m = 1000: ε_lb ≤ 5.78 at δ = 1e-5), which bounds the ratio at
large ε.

(b) Cost, with ``--federated``: ``python -m simulations.audit task=images privacy=<p>`` at the
default sizes, in a subprocess, once per privacy setting; the wall time of each phase from
audit.json (``run.timings_s``: setup, the federated run carrying the canaries, each canary
check's scoring, membership inference with its shadow models, gradient inversion).

Results as a printed table and, with ``--json PATH``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from privacy.accounting import noise_multiplier_for
from simulations.audit.dp_sgd import audit_dp_sgd
from simulations.audit.lower_bound import epsilon_lower_bound

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
IDEALIZED_REFERENCE_RATIO = 0.45  # Steinke et al. 2023, white-box, CIFAR-like DP-SGD


def tightness(epsilon: float, *, canaries: int, steps: int, sample_rate: float,
              seed: int) -> dict:
    """One white-box audit of honest DP-SGD calibrated to ``epsilon``: σ, ε_lb, the ratio."""
    # calibrated exactly as a site plans its σ (Opacus's search, re-checked by the ledger's
    # accountant)
    sigma = noise_multiplier_for(epsilon, DELTA, sample_rate, steps, accountant="prv")
    run = audit_dp_sgd(noise_multiplier=sigma, canaries=canaries, steps=steps,
                       sample_rate=sample_rate, delta=DELTA, seed=seed)
    if abs(run.sample_rate - sample_rate) > 1e-9:  # σ was calibrated for another q
        raise RuntimeError(f"the audit ran at q={run.sample_rate}, σ was calibrated for "
                           f"q={sample_rate}: choose a sample rate that divides 400 records")
    audit = run.audit
    return {"target_epsilon": epsilon, "noise_multiplier": sigma,
            "accountant_epsilon": run.accountant_epsilon, "sample_rate": run.sample_rate,
            "steps": run.steps, "seed": seed, "m": audit.m, "guesses": audit.guesses,
            "correct": audit.correct, "epsilon_lb": audit.epsilon_lb,
            "ratio": audit.epsilon_lb / run.accountant_epsilon, "violated": run.violated,
            "seconds": run.seconds}


def federated_phases(privacy: str, timeout_s: float) -> dict:
    """``python -m simulations.audit task=images privacy=<privacy>`` at default sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "simulations.audit", "task=images", f"privacy={privacy}",
             f"hydra.run.dir={out}"],
            cwd=ROOT, env={**os.environ, "MEDSILO_CACHE": str(Path(tmp) / "cache")},
            capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - started
        if not (out / "audit.json").is_file():
            raise RuntimeError(f"the audit (privacy={privacy}) wrote no audit.json (exit "
                               f"{done.returncode}):\n{done.stderr[-3000:]}")
        audit = json.loads((out / "audit.json").read_text())
    checks = {c["variant"]: {k: c[k] for k in ("accountant_epsilon", "epsilon_lb", "m",
                                               "guesses", "correct")}
              for c in audit["canaries"]}
    return {"privacy": privacy, "exit_code": done.returncode, "command_wall_s": wall,
            "phases_s": audit["run"]["timings_s"], "failed": audit["failed"],
            "canaries": checks, "inversion": audit["inversion"],
            "verdicts": audit["verdicts"]}


def _print_tightness(rows: list[dict], canaries: int) -> None:
    print(f"\nwhite-box one-run audit of honest DP-SGD (δ={DELTA:g}, 95 % confidence; "
          f"reference ratio ≈ {IDEALIZED_REFERENCE_RATIO})")
    print(f"{'ε':>5} {'σ':>7} {'ε acct':>7} {'q':>6} {'steps':>5} {'m':>5} {'guesses':>7} "
          f"{'correct':>7} {'ε_lb':>6} {'ratio':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['target_epsilon']:>5g} {r['noise_multiplier']:>7.3f} "
              f"{r['accountant_epsilon']:>7.3f} {r['sample_rate']:>6.3f} {r['steps']:>5} "
              f"{r['m']:>5} {r['guesses']:>7} {r['correct']:>7} {r['epsilon_lb']:>6.3f} "
              f"{r['ratio']:>6.3f} {r['seconds']:>8.1f}")
    epsilons = sorted({r["target_epsilon"] for r in rows})
    if len(rows) > len(epsilons):  # several seeds: the spread matters as much as the mean
        for eps in epsilons:
            ratios = [r["ratio"] for r in rows if r["target_epsilon"] == eps]
            print(f"ε = {eps:g}: ratio mean {sum(ratios) / len(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} seeds)")
    ceiling = epsilon_lower_bound(canaries, canaries, canaries, delta=DELTA)
    print(f"(ceiling with m={canaries}, every one of m guesses right: ε_lb = {ceiling:.2f})")


def _print_federated(runs: list[dict]) -> None:
    phases = sorted({p for run in runs for p in run["phases_s"]},
                    key=lambda p: (p == "total_s", p))
    print("\nfederated audit, task=images, default sizes: wall seconds per phase")
    print(f"{'phase':<24}" + "".join(f"{'privacy=' + r['privacy']:>16}" for r in runs))
    for phase in phases:
        cells = "".join(f"{r['phases_s'].get(phase, float('nan')):>16.1f}" for r in runs)
        print(f"{phase.removesuffix('_s'):<24}{cells}")
    print(f"{'command (with start-up)':<24}"
          + "".join(f"{r['command_wall_s']:>16.1f}" for r in runs))
    for r in runs:
        print(f"privacy={r['privacy']}: exit {r['exit_code']}; "
              + "; ".join(f"{v['check']}: {v['verdict']} ({v['detail']})"
                          for v in r["verdicts"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=1, help="audits per ε (seeds 0..n-1)")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sample-rate", type=float, default=0.05)
    parser.add_argument("--federated", nargs="*", choices=["dp", "off"], default=None,
                        help="also time the federated audit (task=images) for these privacy "
                             "settings (no value: dp and off)")
    parser.add_argument("--federated-timeout", type=float, default=3600.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")

    torch.set_num_threads(1)  # a tiny linear model: threads only contend on a shared machine
    rows = [tightness(eps, canaries=args.canaries, steps=args.steps,
                      sample_rate=args.sample_rate, seed=seed)
            for eps in args.epsilons for seed in range(args.seeds)]
    _print_tightness(rows, args.canaries)
    runs = []
    if args.federated is not None:
        for privacy in args.federated or ["dp", "off"]:
            runs.append(federated_phases(privacy, args.federated_timeout))
        _print_federated(runs)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__},
            "delta": DELTA, "reference_ratio": IDEALIZED_REFERENCE_RATIO,
            "white_box_tightness": rows, "federated": runs}, indent=2))
        print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
