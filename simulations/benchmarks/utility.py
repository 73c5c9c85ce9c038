"""What privacy costs: every task without DP and at several ε, beside the local and pooled
baselines, in one run.

    python -m simulations.benchmarks.utility [--tasks images vitals notes tabular]
        [--epsilons 1 4 8] [--out DIR] [override ...]

Each cell is a full simulation (``simulations.run.simulate``: Flower's Ray engine, the
default 4 synthetic hospitals and 5 rounds, each task's own defaults: conf/training/) with
``baselines=[local,pooled]``; ``privacy=dp privacy.target_epsilon=ε`` for the DP cells. The
headline metric is AUROC for binary tasks (images, vitals, tabular) and macro-F1 for notes.
For notes the pooled TF-IDF + logistic regression reference (text_reference.py) is added.

Prints one table; writes ``utility.json`` (every cell, with the targets checked),
``utility.md`` and ``privacy_utility.png`` (metric vs ε per task: federated, each hospital
alone, pooled; the non-private federated run as a dashed line) into ``--out``.

Targets (issue 14): DP at ε=8 within 0.05 of the non-private federated run; no collapse (one
class predicted for every test example) at any ε; the federated model at least the hospitals'
mean alone (both on each hospital's own test split: client means).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

TASKS = ("images", "vitals", "notes", "tabular")
HEADLINE = {"images": "auroc", "vitals": "auroc", "tabular": "auroc", "notes": "macro_f1"}
TOLERANCE = 0.05  # DP at ε=8 within this of the non-private federated run


def _metric(metrics: dict[str, Any] | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    return None if value is None or not math.isfinite(value) else float(value)


def run_cell(task: str, epsilon: float | None, out_dir: Path, overrides: list[str]) -> dict:
    """One simulation; the numbers the table needs."""
    from server.settings import compose
    from simulations.run import simulate

    privacy = (["privacy=dp", f"privacy.target_epsilon={epsilon}"] if epsilon is not None
               else ["privacy=off"])
    cfg = compose([f"task={task}", "baselines=[local,pooled]", *privacy, *overrides])
    started = time.perf_counter()
    report = simulate(cfg, out_dir)
    metric = HEADLINE[task]
    final = report["final"]
    baselines = report.get("baselines") or {}
    local, pooled = baselines.get("local") or {}, baselines.get("pooled") or {}
    epsilons = [led["epsilon"] for led in report["privacy"].values()
                if led.get("dp") and led.get("epsilon") is not None]
    return {
        "task": task, "epsilon_target": epsilon, "metric": metric,
        "federated": _metric(final["global"], metric),
        "federated_balanced_accuracy": _metric(final["global"], "balanced_accuracy"),
        "federated_client_mean": _metric(final["client_mean"], metric),
        "collapsed": bool(final.get("collapsed", {}).get("global")),
        "collapsed_sites": list(final.get("collapsed", {}).get("sites", [])),
        "local_client_mean": _metric(local.get("client_mean"), metric),
        "pooled": _metric(pooled.get("global"), metric),
        "epsilon_spent_max": max(epsilons) if epsilons else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "run_dir": str(out_dir),
    }


def check_targets(cells: list[dict]) -> list[dict]:
    """Adds ``targets`` to each cell: pass/fail of each target that applies to it."""
    plain = {c["task"]: c for c in cells if c["epsilon_target"] is None}
    for cell in cells:
        targets: dict[str, bool | None] = {"no_collapse": not cell["collapsed"]}
        fed, local = cell["federated_client_mean"], cell["local_client_mean"]
        targets["federated_at_least_local"] = (None if fed is None or local is None
                                               else fed >= local)
        if cell["epsilon_target"] == 8 and cell["task"] in plain:
            reference = plain[cell["task"]]["federated"]
            targets["within_0.05_of_no_dp"] = (
                None if reference is None or cell["federated"] is None
                else cell["federated"] >= reference - TOLERANCE)
        cell["targets"] = targets
    return cells


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(cells: list[dict], references: dict[str, dict]) -> str:
    lines = ["| task | metric | privacy | federated | bal. acc. | fed. client mean | alone "
             "(mean) | pooled | ε spent (max) | collapsed | targets | wall s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for c in cells:
        privacy = "no DP" if c["epsilon_target"] is None else f"ε={c['epsilon_target']:g}"
        failed = [name for name, ok in c["targets"].items() if ok is False]
        lines.append(
            f"| {c['task']} | {c['metric']} | {privacy} | {_fmt(c['federated'])} | "
            f"{_fmt(c['federated_balanced_accuracy'])} | {_fmt(c['federated_client_mean'])} | "
            f"{_fmt(c['local_client_mean'])} | {_fmt(c['pooled'])} | "
            f"{_fmt(c['epsilon_spent_max'])} | {_fmt(c['collapsed'])} | "
            f"{'MISSED: ' + ', '.join(failed) if failed else 'met'} | {c['wall_s']} |")
    for task, ref in references.items():
        lines.append(f"| {task} | {HEADLINE[task]} | reference: pooled TF-IDF + logistic "
                     f"regression, no DP | {_fmt(_metric(ref, HEADLINE[task]))} | "
                     f"{_fmt(_metric(ref, 'balanced_accuracy'))} | | | | | | | |")
    return "\n".join(lines)


def plot(cells: list[dict], references: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    tasks = list(dict.fromkeys(c["task"] for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        dp = sorted((c for c in cells if c["task"] == task and c["epsilon_target"] is not None),
                    key=lambda c: c["epsilon_target"])
        xs = [c["epsilon_target"] for c in dp]
        for key, label, style in (("federated", "federated (global)", "o-"),
                                  ("local_client_mean", "each hospital alone (mean)", "s--"),
                                  ("pooled", "all data pooled", "^:")):
            ys = [math.nan if c[key] is None else c[key] for c in dp]
            ax.plot(xs, ys, style, label=label)
        plain = [c for c in cells if c["task"] == task and c["epsilon_target"] is None]
        if plain and plain[0]["federated"] is not None:
            ax.axhline(plain[0]["federated"], color="gray", linestyle="--",
                       label="federated, no DP")
        if task in references and _metric(references[task], HEADLINE[task]) is not None:
            ax.axhline(_metric(references[task], HEADLINE[task]), color="black", linestyle=":",
                       label="TF-IDF + LR, pooled, no DP")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured ε are labelled
        ax.set_xlabel("target ε per hospital (δ ≤ 1e-5)")
        ax.set_ylabel(HEADLINE[task])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("privacy–utility: final global model vs ε (synthetic hospitals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/utility"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells, references = [], {}
    for task in args.tasks:
        for epsilon in [None, *sorted(args.epsilons, reverse=True)]:
            name = "no_dp" if epsilon is None else f"eps_{epsilon:g}"
            cells.append(run_cell(task, epsilon, args.out / task / name, args.overrides))
            print(json.dumps(cells[-1]), flush=True)
        if task == "notes":
            references[task] = _text_reference(args.overrides)
    check_targets(cells)
    table = markdown_table(cells, references)
    figure = plot(cells, references, args.out / "privacy_utility.png")
    total = time.perf_counter() - started
    (args.out / "utility.md").write_text(
        "# Privacy–utility benchmark\n\n" + table
        + f"\n\nTotal wall time {total / 60:.1f} min. Plot: `{figure.name}`.\n")
    (args.out / "utility.json").write_text(json.dumps(
        {"cells": cells, "references": references, "total_wall_s": round(total, 1),
         "overrides": args.overrides}, indent=2, allow_nan=False))
    print(table)
    print(f"\n{total / 60:.1f} min; {args.out / 'utility.json'}, {args.out / 'utility.md'}, "
          f"{figure}")


def _text_reference(overrides: list[str]) -> dict[str, float]:
    from server.settings import compose
    from simulations.benchmarks.text_reference import tfidf_logreg_reference
    from simulations.sites import site_folders

    cfg = compose(["task=notes", *overrides])
    metrics = tfidf_logreg_reference(cfg, site_folders(cfg))
    return {k: (None if not math.isfinite(v) else v) for k, v in metrics.items()}


if __name__ == "__main__":
    main()
