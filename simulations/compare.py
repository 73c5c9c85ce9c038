"""Compare finished runs: ``python -m simulations.compare DIR... [--out DIR]``.

Each DIR is a run directory (it holds ``report.json``) or a folder of runs, such as a Hydra
multirun directory (``python -m simulations.run -m privacy.target_epsilon=1,8``): every
``report.json`` up to two levels below it is a run. Written to ``--out`` (default: the first
DIR):

- ``comparison.md`` and ``comparison.csv``: one row per run, the config keys whose values differ
  between the runs, then the final global metrics (AUROC, balanced accuracy, accuracy), the
  largest ε any hospital spent (δ beside it; "no DP" for a run without DP-SGD), the rounds done
  and the run's duration;
- ``privacy_utility.png`` when the runs differ in ε: global AUROC and balanced accuracy against
  the largest ε, runs without DP drawn as horizontal reference lines.

The markdown table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("auroc", "balanced_accuracy", "accuracy")
# differences that only name where a run wrote or read, not what it did
IGNORED_KEYS = ("resume", "report_dir", "data.root", "data.cache_dir")


class CompareError(ValueError):
    """No run found, or a report that cannot be read."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "privacy.target_epsilon" -> 8.0
    metrics: dict[str, float | None]
    epsilon: float | None  # the largest ε a hospital spent; None: no DP-SGD
    delta: float | None
    rounds_done: int
    duration_s: float | None
    stopped_early: str | None
    hospital_epsilon: float | None = None  # privacy=site_dp: the federation's hospital-level ε


def find_reports(paths: Iterable[Path]) -> list[Path]:
    """Every report.json at, or up to two folder levels below, each path (sorted, no repeats)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise CompareError(f"{path} does not exist (expected a run directory or a folder "
                               "of runs)")
        if (path / "report.json").is_file():
            found.append(path / "report.json")
            continue
        below = sorted([*path.glob("*/report.json"), *path.glob("*/*/report.json")])
        if not below:
            raise CompareError(f"{path} holds no report.json (nor do its sub-folders): is it a "
                               "finished run of python -m simulations.run?")
        found += below
    return sorted(dict.fromkeys(p.resolve() for p in found))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_run(report_path: Path) -> Run:
    try:
        report = json.loads(report_path.read_text())
        run = report["run"]
        final = report["final"]["global"] or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompareError(f"{report_path}: not a medsilo report ({err})") from err
    ledgers = [led for led in (report.get("privacy") or {}).values()
               if isinstance(led, Mapping) and led.get("dp")]
    spent = [led for led in ledgers if led.get("epsilon") is not None]
    worst = max(spent, key=lambda led: led["epsilon"]) if spent else None
    return Run(
        path=report_path.parent,
        config=flatten(run.get("config") or {}),
        metrics={name: final.get(name) for name in METRICS},
        epsilon=float(worst["epsilon"]) if worst and run.get("privacy") == "dp" else None,
        delta=worst.get("delta") if worst and run.get("privacy") == "dp" else None,
        rounds_done=len(report.get("rounds") or []),
        duration_s=run.get("duration_s"),
        stopped_early=run.get("stopped_early"),
        hospital_epsilon=(report.get("hospital_privacy") or {}).get("epsilon"),
    )


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (missing counts as a value)."""
    keys = sorted({key for run in runs for key in run.config})
    missing = object()
    return [key for key in keys if not key.startswith(IGNORED_KEYS)
            and len({json.dumps(run.config.get(key, missing), sort_keys=True, default=str)
                     for run in runs}) > 1]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(runs: Sequence[Run], base: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the run, its differing config, final metrics, ε, rounds, duration."""
    keys = differing_keys(runs)
    hospital = any(run.hospital_epsilon is not None for run in runs)
    header = ["run", *keys, *METRICS, "epsilon (max over hospitals)", "delta",
              *(["hospital-level epsilon (site_dp)"] if hospital else []), "rounds done",
              "duration_s"]
    rows = []
    for run in runs:
        name = str(run.path.relative_to(base)) if base and run.path.is_relative_to(base) \
            else str(run.path)
        rounds = str(run.rounds_done) + (" (stopped early)" if run.stopped_early else "")
        rows.append([name, *(_cell(run.config.get(key)) for key in keys),
                     *(_cell(run.metrics[m]) for m in METRICS),
                     "no DP" if run.epsilon is None else _cell(run.epsilon),
                     _cell(run.delta),
                     *([_cell(run.hospital_epsilon) if run.hospital_epsilon is not None
                        else "none"] if hospital else []),
                     rounds, _cell(run.duration_s)])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    escape = str.maketrans({"|": "\\|"})
    lines = ["| " + " | ".join(h.translate(escape) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.translate(escape) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def privacy_utility_plot(runs: Sequence[Run], path: Path) -> bool:
    """Global AUROC and balanced accuracy against the largest ε; False (nothing written) when
    the runs do not differ in ε."""
    private = sorted((run for run in runs if run.epsilon is not None), key=lambda r: r.epsilon)
    spent = {None if run.epsilon is None else round(run.epsilon, 6) for run in runs}
    if not private or len(spent) < 2:
        return False
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for metric, marker in (("auroc", "o"), ("balanced_accuracy", "s")):
        points = [(run.epsilon, run.metrics[metric]) for run in private
                  if run.metrics[metric] is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, label=f"{metric.replace('_', ' ')} (DP-SGD)")
        for run in runs:
            if run.epsilon is None and run.metrics[metric] is not None:
                ax.axhline(run.metrics[metric], linestyle="--", linewidth=1, color="grey")
                ax.annotate(f"no DP: {metric.replace('_', ' ')} {run.metrics[metric]:.3f}",
                            (0.01, run.metrics[metric]), xycoords=("axes fraction", "data"),
                            fontsize=8, va="bottom", color="grey")
    ax.axhline(0.5, linestyle=":", linewidth=1, color="black")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([run.epsilon for run in private])
    ax.set_xlabel("ε spent by the most-spent hospital (log scale)")
    ax.set_ylabel("final global metric (0.5 = chance)")
    ax.set_title("Privacy–utility trade-off across runs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(paths: Sequence[Path], out: Path | None = None) -> dict[str, Any]:
    """Write comparison.md, comparison.csv (and privacy_utility.png) to ``out``; return what
    was written and the table."""
    runs = [load_run(report) for report in find_reports(paths)]
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    base = paths[0].resolve() if len(paths) == 1 else None
    header, rows = table(runs, base)
    text = markdown(header, rows)
    (out / "comparison.md").write_text(f"# {len(runs)} runs compared\n\n" + text)
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    plot = out / "privacy_utility.png"
    written = [out / "comparison.md", out / "comparison.csv"]
    if privacy_utility_plot(runs, plot):
        written.append(plot)
    return {"runs": len(runs), "header": header, "rows": rows, "markdown": text,
            "written": written}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Compare finished runs: the config that differs, final metrics and ε.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run directories or folders of runs (e.g. a multirun directory)")
    parser.add_argument("--out", type=Path, help="where to write (default: the first DIR)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.dirs, args.out)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"], end="")
    for path in result["written"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
