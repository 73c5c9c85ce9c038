"""Hospital-level DP (privacy=site_dp): utility against ε, and what a site_dp round costs.

    python -m simulations.benchmarks.site_dp [--sites 100 1000] [--epsilons 1 2 4 8]
        [--repeats 2] [--rounds 5] [--per-round 20] [--task tabular] [--json PATH]

After one unmeasured warm-up run per N (it writes the synthetic sites), for each number of
hospitals N and each repeat r (seed r), the variants run interleaved
(plain secure, site_dp at each ε, plain secure, ...: load drifts, every variant sees the same
drift), each a fresh ``python -m simulations.run`` subprocess with ``secagg=on``,
``sites_per_round``, ``rounds``, ``baselines=none``:

- ``secure (no DP)``: ``privacy=off``, the example-weighted quantized secure mean;
- ``site_dp ε=x``: ``privacy=site_dp privacy.target_epsilon=x``, every other setting at its
  default (conf/privacy/site_dp.yaml, conf/training/<model>_site_dp.yaml).

Per run: the final global AUROC and accuracy on the pooled test splits (report.json
``final.global``; the initial model's too), the hospital-level ε spent (``hospital_privacy``),
the steady round (median ``rounds[].duration_s`` over rounds 2..R: round 1 also starts Ray's
actors), and two of its SecAgg stages (median over rounds 2..R of ``stage_s``): the masked input
(training + encoding at the sites) and the server's decode. Reported per N and variant: the
median (and min) over repeats; the cost ratio = median site_dp steady round / median secure
steady round, and the same ratio of the adjacent (same-repeat) pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_TIMEOUT_S = 1800
SECURE = "secure (no DP)"


def variant_name(epsilon: float | None) -> str:
    return SECURE if epsilon is None else f"site_dp eps={epsilon:g}"


def overrides(task: str, sites: int, per_round: int, rounds: int, seed: int,
              epsilon: float | None) -> list[str]:
    common = [f"task={task}", f"num_hospitals={sites}", f"sites_per_round={per_round}",
              f"rounds={rounds}", f"seed={seed}", "secagg=on", "baselines=none"]
    if epsilon is None:
        return [*common, "privacy=off"]
    return [*common, "privacy=site_dp", f"privacy.target_epsilon={epsilon:g}"]


def schedule(sites: Iterable[int], epsilons: Sequence[float], repeats: int
             ) -> list[tuple[int, int, float | None]]:
    """(N, repeat, ε or None) in run order: per N and repeat, every variant once, in turn."""
    variants: list[float | None] = [None, *epsilons]
    return [(n, r, eps) for n in sites for r in range(repeats) for eps in variants]


def _median_of_later(values: Sequence[float]) -> float | None:
    later = list(values[1:]) or list(values)
    return statistics.median(later) if later else None


def measure(report: Mapping[str, Any]) -> dict[str, Any]:
    """What one run's report.json says about utility, privacy and cost."""
    rounds = report["rounds"]
    stages = [(r.get("secure_aggregation") or {}).get("stage_s") or {} for r in rounds]
    hospital = report.get("hospital_privacy") or {}
    final, initial = report["final"]["global"], report["initial"]["global"]
    aborted = {r["round"]: (r.get("secure_aggregation") or {}).get("aborted") or r["skipped"]
               for r in rounds if (r.get("secure_aggregation") or {}).get("aborted")
               or r.get("skipped")}
    return {
        "status": "ok" if not aborted else f"rounds {sorted(aborted)} aborted or skipped",
        "aborted": aborted,
        "auroc": final.get("auroc"), "accuracy": final.get("accuracy"),
        "initial_auroc": initial.get("auroc"),
        "epsilon": hospital.get("epsilon"), "planned_epsilon": hospital.get("planned_epsilon"),
        "steady_s": _median_of_later([r["duration_s"] for r in rounds]),
        "masked_input_s": _median_of_later([s.get("masked_input", 0.0) for s in stages]),
        "decode_s": _median_of_later([s.get("decode", 0.0) for s in stages]),
        "duration_s": report["run"]["duration_s"],
    }


def run_one(args: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="site-dp-bench-") as out:
        try:
            done = subprocess.run([sys.executable, "-m", "simulations.run",
                                   f"hydra.run.dir={out}", *args],
                                  capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {RUN_TIMEOUT_S} s"}
        path = Path(out) / "report.json"
        if done.returncode != 0 or not path.is_file():
            return {"status": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}
        return measure(json.loads(path.read_text()))


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (N, variant): medians and minima over repeats, cost vs the secure rows."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for run in runs:
        key = (run["sites"], run["variant"])
        rows.setdefault(key, {"sites": run["sites"], "variant": run["variant"], "runs": []})
        rows[key]["runs"].append(run)
    out = []
    for (sites, variant), row in rows.items():
        ok = [r for r in row["runs"] if r.get("status") == "ok"]

        def stat(name: str, how: Any, runs: list = ok) -> float | None:
            values = [r[name] for r in runs if r.get(name) is not None]
            return how(values) if values else None

        summary = {"sites": sites, "variant": variant, "ok": len(ok), "runs": len(row["runs"]),
                   "auroc": stat("auroc", statistics.median),
                   "auroc_min": stat("auroc", min),
                   "accuracy": stat("accuracy", statistics.median),
                   "initial_auroc": stat("initial_auroc", statistics.median),
                   "epsilon": stat("epsilon", statistics.median),
                   "steady_s": stat("steady_s", statistics.median),
                   "steady_min_s": stat("steady_s", min),
                   "masked_input_s": stat("masked_input_s", statistics.median),
                   "decode_s": stat("decode_s", statistics.median)}
        secure = rows.get((sites, SECURE))
        if variant != SECURE and secure is not None:
            base = [r for r in secure["runs"] if r.get("status") == "ok"]
            base_steady = stat("steady_s", statistics.median, base)
            if summary["steady_s"] and base_steady:
                summary["cost_ratio"] = summary["steady_s"] / base_steady
            by_repeat = {r["repeat"]: r["steady_s"] for r in base if r.get("steady_s")}
            summary["paired_ratios"] = [r["steady_s"] / by_repeat[r["repeat"]] for r in ok
                                        if r.get("steady_s") and r["repeat"] in by_repeat]
        out.append(summary)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| N | variant | AUROC (median, min) | accuracy | hospital ε spent | steady round s "
             "(median, min) | masked input s | decode s | cost vs secure |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("cost_ratio")
        paired = ", ".join(f"{x:.2f}" for x in r.get("paired_ratios") or [])
        lines.append(
            f"| {r['sites']} | {r['variant']} | {_fmt(r['auroc'], '.3f')}, "
            f"{_fmt(r['auroc_min'], '.3f')} | {_fmt(r['accuracy'], '.3f')} | "
            f"{_fmt(r['epsilon'], '.2f')} | {_fmt(r['steady_s'], '.2f')}, "
            f"{_fmt(r['steady_min_s'], '.2f')} | {_fmt(r['masked_input_s'], '.2f')} | "
            f"{_fmt(r['decode_s'], '.3f')} | "
            + (f"{ratio:.2f}× (pairs {paired})" if ratio else "—") + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--task", default="tabular")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = []
    for sites in args.sites:  # writes the synthetic sites, warms caches: not measured
        warmup = run_one(overrides(args.task, sites, args.per_round, 1, 0, None))
        print(f"N={sites} warm-up (1 round, not measured): {warmup['status']}", flush=True)
    for sites, repeat, eps in schedule(args.sites, args.epsilons, args.repeats):
        load = os.getloadavg()[0]
        result = run_one(overrides(args.task, sites, args.per_round, args.rounds, repeat, eps))
        run = {"sites": sites, "repeat": repeat, "variant": variant_name(eps),
               "load_before": load, "load_after": os.getloadavg()[0], **result}
        runs.append(run)
        print(f"N={sites} seed={repeat} {run['variant']}: {run['status']} auroc="
              f"{_fmt(run.get('auroc'), '.3f')} eps={_fmt(run.get('epsilon'), '.2f')} "
              f"steady={_fmt(run.get('steady_s'), '.2f')} s load {load:.1f}->"
              f"{run['load_after']:.1f}", flush=True)
    rows = summarize(runs)
    result = {"task": args.task, "rounds": args.rounds, "sites_per_round": args.per_round,
              "runs": runs, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(rows, indent=1, default=str))
    print(table(rows))


if __name__ == "__main__":
    main()
