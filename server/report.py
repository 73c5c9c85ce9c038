"""The run's results for machines (``report.json``) and people (``report.md``, ``plots/``).

``report.json`` is the contract other tools and tests read::

    {"run": {...}, "rounds": [{"round", "global", "sites", "train", "failures", "declined",
     "refused"}], "initial": {"global"},
     "final": {"global", "sites", "client_mean"}, "privacy": {site: {...}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import write_atomically
from server.history import RunHistory

HEADLINE_METRICS = ("loss", "accuracy", "balanced_accuracy", "auroc", "auprc", "macro_f1")


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: an undefined metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _site_metrics(record_sites: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for site, metrics in sorted(record_sites.items()):
        entry = dict(metrics)
        entry["num_examples"] = int(entry.pop("num-examples", 0))
        out[site] = entry
    return out


def client_mean(sites: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Unweighted mean over sites of each metric (undefined values are left out)."""
    means: dict[str, float | None] = {}
    for name in HEADLINE_METRICS:
        values = [m[name] for m in sites.values()
                  if m.get(name) is not None and math.isfinite(m[name])]
        means[name] = float(np.mean(values)) if values else None
    return means


def build_report(
    cfg: Mapping[str, Any],
    history: RunHistory,
    *,
    duration_s: float,
    global_evaluation: str,
    stopped: str | None = None,
) -> dict[str, Any]:
    rounds = []
    for number in sorted(history.rounds):
        record = history.rounds[number]
        rounds.append(
            {
                "round": number,
                "global": record.global_metrics or {},
                "sites": _site_metrics(record.sites),
                "train": _site_metrics(record.train),
                "failures": record.failures,
                "declined": dict(sorted(record.declined.items())),
                "refused": dict(sorted(record.refused.items())),
                "received": dict(sorted(record.received.items())),
                "rejected": dict(sorted(record.rejected.items())),
                "timed_out": list(record.timed_out),
                "skipped": record.skipped_round,  # why the global model did not change
                "update_norms": dict(sorted(record.update_norms.items())),
                # secagg=on: sites aggregated / dropped, abort reason, bytes each site uploaded
                "secure_aggregation": record.secure_aggregation,
            }
        )
    last = rounds[-1] if rounds else {"global": {}, "sites": {}}
    sites = sorted({site for r in rounds for site in r["sites"]} |
                   {site for r in rounds for site in r["train"]} |
                   {site for r in rounds for site in r["declined"]} |
                   {site for r in rounds for site in r["refused"]} |
                   {site for r in rounds for site in r["rejected"]})
    report = {
        "run": {
            "task": cfg["task"]["name"],
            "model": cfg["model"]["name"],
            "strategy": cfg["strategy"]["name"],
            "rounds": cfg["rounds"],
            "num_hospitals": cfg["num_hospitals"],
            "seed": cfg["seed"],
            "privacy": "dp" if cfg["privacy"]["name"] != "off" else "off",
            "secure_aggregation": cfg["secagg"]["name"] != "off",
            "global_evaluation": global_evaluation,
            "duration_s": round(duration_s, 3),
            "stopped_early": stopped,
            "versions": {pkg: version(pkg) for pkg in ("flwr", "torch", "opacus")},
            "config": cfg,
        },
        "initial": {"global": history.initial_global or {}},
        "rounds": rounds,
        "final": {
            "global": last["global"],
            "sites": last["sites"],
            "client_mean": client_mean(last["sites"]),
        },
        "privacy": _privacy_section(cfg, history, sites),
        "data": {site: {"skipped": history.latest_skipped().get(site, {})} for site in sites},
    }
    return _clean(report)


def _privacy_section(
    cfg: Mapping[str, Any], history: RunHistory, sites: list[str]
) -> dict[str, dict[str, Any]]:
    """Per site: ``{"dp": false}`` without DP (never epsilon = 0), else its ledger."""
    if cfg["privacy"]["name"] == "off":
        return {site: {"dp": False} for site in sites}
    ledgers = history.latest_ledgers()
    return {site: {"dp": True, **ledgers[site]} for site in sorted(set(sites) | set(ledgers))
            if site in ledgers}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    run, final = report["run"], report["final"]
    lines = [
        f"# medsilo run: {run['task']} / {run['model']} / {run['strategy']}",
        "",
        f"{run['num_hospitals']} hospitals, {run['rounds']} rounds, seed {run['seed']}, "
        f"{run['duration_s']:.1f} s. Secure aggregation: "
        f"{'on' if run['secure_aggregation'] else 'off'}.",
        "",
        "## Privacy",
        "",
    ]
    if run["privacy"] == "off":
        lines.append("**No differential privacy.** Sites trained without DP-SGD: nothing bounds "
                     "what the model reveals about an individual patient record.")
    else:
        lines += _privacy_markdown(report["privacy"])
    if run.get("stopped_early"):
        lines += ["", f"**The run stopped early:** {run['stopped_early']}"]
    pooled = run["global_evaluation"] == "pooled"
    where = ("the union of all sites' test splits" if pooled
             else "each site's test split, example-weighted mean")
    lines += [
        "",
        "## Final metrics",
        "",
        f"*Global* = the final global model on {where}; *client mean* = unweighted mean over "
        "sites; per site = on that site's own test split.",
        "",
        "| | examples | " + " | ".join(HEADLINE_METRICS) + " |",
        "|---|---:|" + "---:|" * len(HEADLINE_METRICS),
    ]
    rows = [("**global**", "", final["global"]), ("**client mean**", "", final["client_mean"])]
    rows += [(site, m.get("num_examples", ""), m) for site, m in final["sites"].items()]
    for name, n, metrics in rows:
        values = " | ".join(_fmt(metrics.get(k)) for k in HEADLINE_METRICS)
        lines.append(f"| {name} | {n} | {values} |")
    skipped = {s: d["skipped"] for s, d in report.get("data", {}).items() if d["skipped"]}
    if skipped:
        lines += ["", "Records the sites' loaders left out (counted, not silently dropped): "
                  + "; ".join(f"{s}: " + ", ".join(f"{n} {why}" for why, n in d.items())
                              for s, d in skipped.items())]
    lines += ["", "## Rounds", ""]
    initial = report["initial"]["global"]
    if initial:
        lines.append(f"- round 0 (initial model): global loss {_fmt(initial.get('loss'))}, "
                     f"accuracy {_fmt(initial.get('accuracy'))}")
    for r in report["rounds"]:
        g = r["global"]
        line = (f"- round {r['round']}: global loss {_fmt(g.get('loss'))}, accuracy "
                f"{_fmt(g.get('accuracy'))}, AUROC {_fmt(g.get('auroc'))}; "
                f"{len(r['train'])} sites trained")
        if r["declined"]:
            line += "; declined: " + "; ".join(f"{s} ({why})" for s, why in r["declined"].items())
        if r.get("refused"):
            line += "; refused: " + "; ".join(f"{s} ({why})" for s, why in r["refused"].items())
        if r.get("rejected"):
            line += "; update rejected: " + "; ".join(f"{s} ({why})"
                                                      for s, why in r["rejected"].items())
        secure = r.get("secure_aggregation")
        if secure:
            line += (f"; secure aggregation of {len(secure['aggregated'])} sites"
                     + (f", dropped and recovered: {', '.join(secure['dropped'])}"
                        if secure["dropped"] and not secure["aborted"] else "")
                     + (f", ABORTED (nothing revealed): {secure['aborted']}"
                        if secure["aborted"] else ""))
        if r.get("timed_out"):
            line += "; no answer in time: " + ", ".join(r["timed_out"])
        if r.get("skipped"):
            line += f"; ROUND SKIPPED, global model unchanged: {r['skipped']}"
        if r["failures"]:
            line += "; failed: " + "; ".join(f"{f['stage']} on node {f['node_id']}: "
                                            f"{f['reason']}" for f in r["failures"])
        lines.append(line)
    lines += ["", "Plots: `plots/global_metrics.png`, `plots/sites_<metric>.png`.", ""]
    return "\n".join(lines)


def _privacy_markdown(privacy: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "Each hospital trained with DP-SGD (per-example gradient clipping + Gaussian noise) and",
        "accounted for its own privacy over every round it trained. **(ε, δ)-DP per patient "
        "record at each site** means: whether or not any one patient's record was in that site's",
        "training data, the probability of any outcome of the whole collaboration (all updates",
        "the site sent, hence the final model) changes by at most a factor e^ε, except with",
        "probability δ. Smaller ε is stronger; δ is set below 1/(number of the site's training",
        "records) so that it cannot cover leaking one record outright.",
        "",
        "| site | ε spent | δ | budget (max ε) | noise σ | sample rate q | steps | rounds "
        "trained | rounds declined | accountant |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for site, led in privacy.items():
        lines.append(
            f"| {site} | {_fmt(led.get('epsilon'))} | {led.get('delta', 0):.1e} | "
            f"{_fmt(led.get('max_epsilon')) if led.get('max_epsilon') else 'none'} | "
            f"{_fmt(led.get('noise_multiplier'))} | {_fmt(led.get('sample_rate'))} | "
            f"{led.get('steps')} | {led.get('rounds_trained')} | {led.get('rounds_declined')} | "
            f"{led.get('accountant')} |"
        )
    lines += ["", "ε per round per site: `plots/privacy_epsilon.png`."]
    return lines


def plot_report(report: Mapping[str, Any], plots_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots_dir.mkdir(parents=True, exist_ok=True)
    rounds = report["rounds"]
    xs = [0] + [r["round"] for r in rounds]
    series = [report["initial"]["global"]] + [r["global"] for r in rounds]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, ("loss", "accuracy", "auroc"), strict=True):
        ax.plot(xs, [s.get(name) if s.get(name) is not None else np.nan for s in series],
                marker="o")
        ax.set_title(f"global {name}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(plots_dir / "global_metrics.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    sites = sorted({s for r in rounds for s in r["sites"]})
    for name in ("accuracy", "auroc", "loss"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for site in sites:
            ys = [r["sites"].get(site, {}).get(name) for r in rounds]
            ax.plot([r["round"] for r in rounds], [np.nan if y is None else y for y in ys],
                    marker=".", label=site)
        ax.set_title(f"{name} per site (own test split)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(sites) <= 12:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(plots_dir / f"sites_{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    dp_sites = {s: led for s, led in report["privacy"].items() if led.get("dp")}
    if dp_sites:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for site, led in dp_sites.items():
            eps = led.get("epsilon_per_round") or []
            ax.plot(range(1, len(eps) + 1), eps, marker=".", label=site)
            if led.get("max_epsilon"):
                ax.axhline(led["max_epsilon"], linestyle=":", color="gray")
        ax.set_title("cumulative ε per site (dotted: budget)")
        ax.set_xlabel("rounds trained")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ε")
        ax.grid(alpha=0.3)
        if len(dp_sites) <= 12:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(plots_dir / "privacy_epsilon.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def write_report(
    out_dir: Path,
    report: Mapping[str, Any],
    final_state_dict: Mapping[str, Any] | None,
) -> None:
    """Write report.json, report.md, plots/ and model.pt into ``out_dir``."""
    import io

    import torch

    out_dir = Path(out_dir)
    plot_report(report, out_dir / "plots")
    if final_state_dict is not None:
        buffer = io.BytesIO()
        cfg = report["run"]["config"]
        torch.save({"state_dict": dict(final_state_dict), "model": cfg["model"],
                    "task": cfg["task"]}, buffer)
        write_atomically(out_dir / "model.pt", buffer.getvalue())
    write_atomically(out_dir / "report.md", render_markdown(report).encode())
    # report.json last: its presence means the run's outputs are complete.
    write_atomically(out_dir / "report.json", json.dumps(report, indent=2).encode())
