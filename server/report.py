"""The run's results for machines (``report.json``) and people (``report.md``, ``plots/``).

``report.json`` is the contract other tools and tests read::

    {"run": {...}, "rounds": [{"round", "global", "sites", "train", "failures", "declined",
     "refused", "asked", "received", "updates": {site: {"dp_sgd", "noise_multiplier",
     "masked"}}, "started_at", "duration_s", ...}], "initial": {"global"},
     "final": {"global", "sites", "client_mean"}, "privacy": {site: {...}},
     "privacy_guarantee": {"dp", "unit", "covered": [...], "not_covered": [...], ...},
     "sites": {site: {"rounds_asked", "rounds_trained", "last_round_trained", "num_examples",
                      "final", "dp", ["epsilon", ...]}},
     "baselines": null | {"local": {"sites", "client_mean", "privacy"},
                          "pooled": {"global", "sites", "client_mean", "privacy"}, "epochs", ...}}

``sites.csv`` holds the ``sites`` table as one row per site (``num_examples`` there is
``train_examples``; the final evaluation's count is ``test_examples``). Above ``MANY_SITES`` sites,
report.md and the plots summarize sites (quantiles, worst sites, distributions) instead of
listing each one (server/site_summary.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import write_atomically
from server import site_summary
from server.history import RoundRecord, RunHistory
from server.site_summary import HEADLINE_METRICS, MANY_SITES, shorten


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


def is_collapsed(metrics: Mapping[str, Any] | None) -> bool:
    """A constant predictor: one class for every test example although several are present
    (client/evaluation.py ``collapsed``). In deployment the global metrics are the sites'
    example-weighted mean, so there the global model counts as collapsed only if it was at
    every site that evaluated it."""
    value = (metrics or {}).get("collapsed")
    return value is not None and math.isfinite(value) and value >= 1.0


def collapse_summary(global_metrics: Mapping[str, Any] | None,
                     sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """report.json ``final.collapsed``: whether the final global model, and at which sites the
    final model, predicts one class for every test example."""
    return {"global": is_collapsed(global_metrics),
            "sites": sorted(site for site, m in sites.items() if is_collapsed(m))}


def collapse_warnings(report: Mapping[str, Any]) -> list[str]:
    """Plain sentences for the console and report.md when a model predicts one class only."""
    collapsed = report["final"].get("collapsed") or {}
    warnings = []
    if collapsed.get("global"):
        warnings.append(
            "The final global model predicts the same class for every test example (balanced "
            f"accuracy {_fmt(report['final']['global'].get('balanced_accuracy'))}): it has not "
            "learned to tell the classes apart. Its accuracy is only the majority share. "
            "docs/utility.md gives the settings measured to train under DP and under label "
            "skew (class_balance=logit_adjust with optimizer=sgd held up there; server-side "
            "Adam and FedProx did not).")
    sites = collapsed.get("sites") or []
    if sites and not collapsed.get("global"):
        warnings.append(f"At {len(sites)} of {len(report['final']['sites'])} sites the final "
                        "model predicts one class for every test example: "
                        f"{shorten(list(sites))}.")
    return warnings


def build_report(
    cfg: Mapping[str, Any],
    history: RunHistory,
    *,
    duration_s: float,
    global_evaluation: str,
    pooled_sites: list[str] | None = None,
    stopped: str | None = None,
    baselines: Mapping[str, Any] | None = None,
    hospital_privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``baselines``: simulations/baselines.py's models trained alone and pooled (None: off).
    ``hospital_privacy``: privacy=site_dp's ledger (server/site_dp.py), beside the per-site
    DP-SGD ledgers in ``privacy``."""
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
                # site -> how the model update it sent this round was protected
                "updates": updates_sent(record),
                # secagg=on: sites aggregated / dropped, abort reason, bytes each site uploaded
                "secure_aggregation": record.secure_aggregation,
                "asked": record.asked,  # sites sent the training message (sampling)
                "started_at": record.started_at,
                "duration_s": record.duration_s,
            }
        )
    last = rounds[-1] if rounds else {"global": {}, "sites": {}}
    sites = sorted({site for r in rounds for site in r["sites"]} |
                   {site for r in rounds for site in r["train"]} |
                   {site for r in rounds for site in r["declined"]} |
                   {site for r in rounds for site in r["refused"]} |
                   {site for r in rounds for site in r["rejected"]})
    dp = cfg["privacy"]["name"] != "off"
    privacy = _privacy_section(cfg, history, sites)
    report = {
        "run": {
            "task": cfg["task"]["name"],
            "model": cfg["model"]["name"],
            "strategy": cfg["strategy"]["name"],
            "rounds": cfg["rounds"],
            "num_hospitals": cfg["num_hospitals"],
            "seed": cfg["seed"],
            "privacy": "dp" if dp else "off",  # record level: DP-SGD at the sites
            "hospital_privacy": "site_dp" if hospital_privacy else "off",
            "secure_aggregation": cfg["secagg"]["name"] != "off",
            "global_evaluation": global_evaluation,
            # simulation: whose test splits the global metrics pool (simulation.pooled_eval_sites)
            "pooled_evaluation_sites": pooled_sites,
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
            "collapsed": collapse_summary(last["global"], last["sites"]),
        },
        "privacy": privacy,
        "privacy_guarantee": privacy_guarantee(cfg),
        "hospital_privacy": dict(hospital_privacy) if hospital_privacy else None,
        "data": {site: {"skipped": history.latest_skipped().get(site, {})} for site in sites},
        "sites": site_summary.site_table(rounds, last["sites"], privacy, dp=dp),
        "baselines": baselines,
    }
    return _clean(report)


def updates_sent(record: RoundRecord) -> dict[str, dict[str, Any]]:
    """report.json ``rounds[].updates``: site -> how the model update it sent was protected.

    A site sent an update when the server received its training reply and the site neither
    declined nor refused (a rejected update still left the site). ``dp_sgd``: the reply carried
    the site's privacy ledger with DP-SGD steps at a noise multiplier σ > 0, the evidence the
    server holds that the update was trained with noise; ``masked``: it came as a secure-
    aggregation masked input, so the server saw only the sum. The site's own egress log
    (client/egress.py) records the same two facts for the same content id (``received``).
    """
    secure = record.secure_aggregation is not None
    out: dict[str, dict[str, Any]] = {}
    for site, stages in sorted(record.received.items()):
        if "train" not in stages or site in record.declined or site in record.refused:
            continue
        ledger = record.privacy.get(site) or {}
        sigma = ledger.get("noise_multiplier")
        dp = bool(ledger.get("steps")) and sigma is not None and float(sigma) > 0
        out[site] = {"dp_sgd": dp, "noise_multiplier": float(sigma) if dp else None,
                     "masked": secure}
    return out


def _privacy_section(
    cfg: Mapping[str, Any], history: RunHistory, sites: list[str]
) -> dict[str, dict[str, Any]]:
    """Per site: ``{"dp": false}`` without DP (never epsilon = 0), else its ledger."""
    if cfg["privacy"]["name"] == "off":
        return {site: {"dp": False} for site in sites}
    ledgers = history.latest_ledgers()
    return {site: {"dp": True, **ledgers[site]} for site in sorted(set(sites) | set(ledgers))
            if site in ledgers}


def privacy_guarantee(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the run's DP guarantee covers, and what else left the sites outside it.

    Built from the run's settings alone (no constant claims: ε is each site's own ledger in
    ``privacy``). Under DP-SGD the guarantee covers the model updates a site sent and what the
    server computed from them; anything else a site sends, or any training input computed from
    many records at once, is listed as not covered.
    """
    if cfg["privacy"]["name"] == "off" and cfg.get("hospital_privacy"):
        return {"dp": False, "covered": [],
                "not_covered": ["no record-level DP-SGD ran at the sites: a patient record is "
                                "protected only as part of its hospital's contribution, by the "
                                "hospital-level guarantee (report.json hospital_privacy)"]}
    if cfg["privacy"]["name"] == "off":
        return {"dp": False, "covered": [],
                "not_covered": ["everything the sites sent: model updates trained without "
                                "DP-SGD, training loss, evaluation metrics and example counts"]}
    task = cfg["task"]
    covered = [
        "the model updates each site sent, trained with DP-SGD (Poisson sampling, per-example "
        "gradient clipping, Gaussian noise σ from the site's ledger), and everything computed "
        "from them: the aggregated and final model, update norms, checkpoints",
        "the training steps a site ran (epochs / q, as its ledger's sample rate q states); no "
        "training loss is sent under DP",
    ]
    not_covered = []
    standardize = task.get("standardize")
    if standardize == "reference":
        covered.append("feature standardisation and missing-value imputation: fixed reference "
                       "values from configuration (task.reference), outside every site's data, "
                       "no privacy cost")
    elif standardize == "site":
        not_covered.append("feature standardisation from each site's own training-split "
                           "mean/sd (task.standardize=site): one patient moves every other "
                           "patient's features, which DP-SGD does not bound; the updates are "
                           "then not (ε, δ)-DP in that patient")
    else:  # the task fits nothing to site data (images: fixed pixel scale; notes: hashing)
        covered.append("preprocessing fixed by configuration (the task fits no statistics to "
                       "site data)")
    if cfg.get("class_balance", "none") != "none" and task.get("class_prior") is not None:
        covered.append("the class prior of logit adjustment: public (task.class_prior), never "
                       "a site's own label counts")
    covered_counts, leaked_counts = _count_release(cfg["privacy"])
    covered += covered_counts
    not_covered += leaked_counts
    not_covered += [
        "each site's evaluation metrics on its own test split (loss, accuracy, AUROC, ...) and "
        "the number of test examples: test-split patients are not protected by DP-SGD",
        "the data-quality counts a site reports with its evaluation (records and values its "
        "loader left out, and why)",
    ]
    return {
        "dp": True,
        "unit": "one patient record in one site's training split (add or remove)",
        "accountant": cfg["privacy"].get("accountant"),
        "standardize": standardize,
        "covered": covered,
        "not_covered": not_covered,
    }


def _count_release(privacy_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(covered, not covered) for the training-set size a site sends with its update.

    COUNTS: keep in step with how a DP site releases its size (client/app.py train_with_dp,
    ``privacy.count_noise``)."""
    noise = privacy_cfg.get("count_noise")
    default_delta = privacy_cfg.get("delta") is None
    if noise:
        return ([f"each site's training-set size: released once as a noisy count ñ (Gaussian, "
                 f"sd {noise} examples) charged to its ledger; the example count sent with "
                 "each update, the ledger's q"
                 + (" and its default δ" if default_delta else "") + " are computed from ñ"],
                [])
    return ([], ["each site's exact number of training examples, sent with every update "
                 "(num_examples) and implied by its ledger's sample rate q"
                 + (" and default δ" if default_delta else "")])


def _guarantee_markdown(guarantee: Mapping[str, Any]) -> list[str]:
    lines = ["", "**What this guarantee covers** (report.json `privacy_guarantee`):", ""]
    lines += [f"- {item}" for item in guarantee["covered"]]
    lines += ["", "**Sent by the sites but not covered by it:**", ""]
    lines += [f"- {item}" for item in guarantee["not_covered"]]
    return lines


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _named(entries: Mapping[str, str] | list[str], sep: str = "; ") -> str:
    """Sites of a round line, with their reasons: at most a few, then "and N more"."""
    if isinstance(entries, Mapping):
        return shorten([f"{s} ({why})" for s, why in entries.items()], sep=sep)
    return shorten(list(entries), sep=sep)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: header, warnings, privacy, final metrics, baselines, rounds, plots."""
    run = report["run"]
    many = len(report.get("sites", {})) > MANY_SITES
    lines = [
        f"# medsilo run: {run['task']} / {run['model']} / {run['strategy']}",
        "",
        opening_sentence(report),
        "",
        f"{run['num_hospitals']} hospitals, {run['rounds']} rounds, seed {run['seed']}, "
        f"{run['duration_s']:.1f} s. Secure aggregation: "
        f"{'on' if run['secure_aggregation'] else 'off'}.",
        "",
    ]
    warnings = collapse_warnings(report)
    if warnings:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in warnings] + [""]
    lines += _privacy_markdown_section(report, many)
    lines += _egress_markdown(report, many)
    if run.get("stopped_early"):
        lines += ["", f"**The run stopped early:** {run['stopped_early']}"]
    lines += _final_metrics_section(report, many)
    lines += _skipped_records_markdown(report, many)
    lines += _baselines_markdown(report)
    lines += _rounds_section(report)
    lines += ["", "Plots: `plots/global_metrics.png`, `plots/sites_<metric>.png`"
              + (" (median and p10–p90 band over sites)" if many else "")
              + ", `plots/participation.png`"
              + (", `plots/privacy_epsilon.png`" if _dp_sites(report) else "") + ".", ""]
    return "\n".join(lines)


def _secure_words(on: bool) -> str:
    return ("the server saw only the sum of the hospitals' model updates, never one hospital's "
            "(secure aggregation)" if on else
            "the server saw each hospital's model update on its own (no secure aggregation)")


def _delta_words(deltas: set[float]) -> str:
    return (f"δ = {next(iter(deltas)):.0e}" if len(deltas) == 1
            else f"δ at most {max(deltas):.0e}")


def _epsilon_words(values: Iterable[float]) -> str:
    values = sorted(set(values))
    return (f"ε = {values[0]:.2f}" if len(values) == 1
            else f"ε {values[0]:.2f} to {values[-1]:.2f}")


def opening_sentence(report: Mapping[str, Any]) -> str:
    """report.md's first sentence, for a privacy officer: what was protected, at what ε (the
    sites' own accountants, never a constant; "without differential privacy" when off, never
    ε = 0), whether a budget held, and whether the server saw single updates."""
    run = report["run"]
    what = (f"This run trained one {run['task']} model across {run['num_hospitals']} "
            "hospitals")
    hospital = report.get("hospital_privacy")
    if hospital:
        return _hospital_sentence(what, hospital, run, _record_level_sentence(report, what))
    return _record_level_sentence(report, what)


def _hospital_sentence(what: str, hospital: Mapping[str, Any], run: Mapping[str, Any],
                       record_level: str) -> str:
    """privacy=site_dp: the hospital-level bound first, then the record-level one (if any)."""
    sentence = (f"{what} with hospital-level differential privacy: everything any one hospital "
                "contributed to the model over the whole run (all its patients together) was "
                f"protected with a privacy loss of at most ε = {hospital['epsilon']:.2f} "
                f"(δ = {hospital['delta']:.0e}, planned at most "
                f"{hospital['planned_epsilon']:.2f}; smaller is stronger), by noise each "
                "hospital added itself inside secure aggregation, so the server only ever saw "
                f"noised sums of at least {hospital['threshold']} hospitals' updates.")
    if run["privacy"] == "off":
        return sentence + (" No record-level DP-SGD ran: a patient is protected only through "
                           "their hospital's update; this ε bounds removing that update, and "
                           "changing one patient's record (replacing the update by another) is "
                           "bounded only by applying it twice (about 2ε), not by a guarantee "
                           "of its own.")
    return sentence + " In addition, " + record_level[0].lower() + record_level[1:]


def _record_level_sentence(report: Mapping[str, Any], what: str) -> str:
    run = report["run"]
    secure = _secure_words(bool(run["secure_aggregation"]))
    if run["privacy"] == "off":
        return (f"{what} without differential privacy: nothing limits what the model, or the "
                f"updates the hospitals sent, reveal about any one patient, and {secure}.")
    table = report.get("sites", {})
    epsilons = site_summary.epsilon_values(table)
    trained_without = sorted(s for s, row in table.items()
                             if row.get("epsilon") is None and row.get("rounds_trained"))
    if not epsilons:
        why = (f"{len(trained_without)} hospital(s) trained but none reported its privacy "
               "accountant's ε, so this report cannot state the protection (see Privacy)"
               if trained_without else "no hospital trained, so no patient record was used")
        return f"{what} with differential privacy, but {why}; {secure}."
    worst = max(epsilons.values())
    deltas = {float(table[s]["delta"]) for s in epsilons if table[s].get("delta") is not None}
    sentence = (f"{what} with differential privacy: each patient record in a hospital's "
                f"training data was protected with a privacy loss of at most ε = {worst:.2f} "
                f"({_delta_words(deltas) + ', ' if deltas else ''}computed by each hospital's "
                "own privacy accountant; smaller is stronger)")
    budgets = {s: float(row["max_epsilon"]) for s, row in table.items()
               if row.get("max_epsilon") is not None}
    if budgets:
        over = sorted(s for s, eps in epsilons.items()
                      if s in budgets and eps > budgets[s] + 1e-9)
        if over:
            sentence += (f", ABOVE the budget at {len(over)} hospital(s) ({shorten(over)}: "
                         f"budget {_epsilon_words(budgets[s] for s in over)})")
        elif set(budgets) >= set(table):
            sentence += f", within each hospital's budget of {_epsilon_words(budgets.values())}"
        else:
            sentence += (f", within the budget of {_epsilon_words(budgets.values())} that "
                         f"{len(budgets)} of the hospitals set")
        stopped = sorted(s for s, led in report.get("privacy", {}).items()
                         if (led.get("rounds_declined") or 0) > 0)
        if stopped:
            sentence += (f" ({len(stopped)} hospital(s) declined rounds to stay within it: "
                         f"{shorten(stopped)})")
    if trained_without:
        sentence += (f"; {len(trained_without)} hospital(s) that trained reported no ε "
                     f"({shorten(trained_without)})")
    return sentence + f"; {secure}."


def epsilon_meaning(epsilon: float, delta: float | None) -> str:
    """ε in one concrete paragraph: the odds bound of (ε, δ)-DP and its hypothesis-test form
    (Kairouz, Oh, Viswanath 2015: TPR ≤ e^ε·FPR + δ), with the run's own numbers."""
    factor = math.exp(epsilon)
    sure = factor / (1.0 + factor)
    delta_text = f"δ = {delta:.0e}" if delta is not None else "δ"
    return (
        f"**What ε = {epsilon:.2f} means.** Take an attacker who sees everything the guarantee "
        "covers (the updates a hospital sent, the final model) and knows every other patient's "
        "record. However they use it, their odds that one particular patient's record was in a "
        f"hospital's training data can rise at most e^ε ≈ {factor:,.3g}-fold over what they "
        f"believed beforehand, except with a small probability {delta_text} that this bound "
        f"fails: a 50:50 guess can become at most {sure:.2%} sure. Put as a test: if it "
        "wrongly names a fraction f of patients who were not used, it can rightly name at most "
        f"e^ε·f + δ of those who were. This is a worst case, not what a typical attack achieves "
        "(the privacy audit, `python -m simulations.audit`, measures that); for comparison, "
        f"ε = 1 would limit the rise to {math.e:.1f}-fold (50:50 to at most "
        f"{math.e / (1 + math.e):.0%}).")


def _worst_epsilon(report: Mapping[str, Any]) -> tuple[float, float | None] | None:
    table = report.get("sites", {})
    epsilons = site_summary.epsilon_values(table)
    if not epsilons:
        return None
    site = max(epsilons, key=lambda s: (epsilons[s], s))
    delta = table[site].get("delta")
    return epsilons[site], None if delta is None else float(delta)


def _hospital_privacy_markdown(hospital: Mapping[str, Any]) -> list[str]:
    """report.md: the hospital-level ledger (privacy=site_dp), beside the per-site ledgers."""
    lines = ["### Hospital level (privacy=site_dp)", "",
             f"**ε = {hospital['epsilon']:.3f}** spent of a plan of at most "
             f"{hospital['planned_epsilon']:.3f} (target {hospital['target_epsilon']:g}), "
             f"δ = {hospital['delta']:.0e}, over {hospital['rounds_released']} released of "
             f"{hospital['rounds_planned']} planned rounds. Unit: {hospital['unit']}; "
             f"adjacency: {hospital['adjacency']}. Mechanism: {hospital['mechanism']}. "
             f"Amplification by sampling: {hospital['amplification']}. The model moved by the "
             f"{hospital['mean']}, each delta clipped to L2 norm {hospital['clip']:g}"
             + (" (adaptive clipping)" if hospital["adaptive_clipping"] else "") + ".",
             "",
             f"Who is trusted: {hospital['trusted']}. Noise removed by dropouts: "
             f"{hospital['noise_removed_by_dropouts']}.", "",
             "| round | survivors | clip | noise std of the sum (planned / released / full "
             "cohort) | variance removed by dropouts | ε after |",
             "|---|---|---|---|---|---|"]
    for r in hospital["rounds"]:
        noise = r.get("noise")
        if noise is None:
            lines.append(f"| {r['round']} | 0 (nothing released) | | | | "
                         f"{r['epsilon_after']:.3f} |")
            continue
        lines.append(f"| {r['round']} | {r['survivors']} | {r['clip']:.3g} | "
                     f"{noise['planned_sum_std']:.3g} / {noise['released_sum_std']:.3g} / "
                     f"{noise['full_cohort_sum_std']:.3g} | "
                     f"{noise['variance_removed_by_dropouts']:.0%} | {r['epsilon_after']:.3f} |")
    return lines + [""]


def _privacy_markdown_section(report: Mapping[str, Any], many: bool) -> list[str]:
    run, site_rows = report["run"], report.get("sites", {})
    lines = ["## Privacy", ""]
    hospital = report.get("hospital_privacy")
    if hospital:
        lines += _hospital_privacy_markdown(hospital)
        lines += ["### Record level (DP-SGD at each site)", ""]
    worst = _worst_epsilon(report) if run["privacy"] != "off" else None
    if worst is not None:
        lines += [epsilon_meaning(*worst), ""]
    if run["privacy"] == "off" and hospital:
        lines.append("**No record-level DP-SGD.** A patient record is protected as part of its "
                     "hospital's contribution, by the hospital-level bound above.")
    elif run["privacy"] == "off":
        lines.append("**No differential privacy.** Sites trained without DP-SGD: nothing bounds "
                     "what the model reveals about an individual patient record.")
    elif many:
        lines += _privacy_summary_markdown(site_rows)
    else:
        lines += _privacy_markdown(report["privacy"])
        never = [s for s, row in site_rows.items()
                 if row.get("privacy") == site_summary.NEVER_TRAINED]
        if never:
            lines += ["", "No ε for " + ", ".join(never) + ": never trained, no records used."]
    if run["privacy"] != "off" and report.get("privacy_guarantee"):
        lines += _guarantee_markdown(report["privacy_guarantee"])
    return lines


def egress_counts(report: Mapping[str, Any]) -> dict[str, Counter[str]]:
    """Site -> counts of what the server received from it over the run: ``updates`` (model
    updates), ``dp_sgd`` (of those, trained with DP-SGD noise), ``masked`` (of those, secure-
    aggregation masked inputs) and ``evaluations`` (evaluation replies: metrics only)."""
    counts: dict[str, Counter[str]] = {}
    for entry in report["rounds"]:
        for site, stages in (entry.get("received") or {}).items():
            counts.setdefault(site, Counter())["evaluations"] += "evaluate" in stages
        for site, update in (entry.get("updates") or {}).items():
            c = counts.setdefault(site, Counter())
            c["updates"] += 1
            c["dp_sgd"] += bool(update["dp_sgd"])
            c["masked"] += bool(update["masked"])
    return dict(sorted(counts.items()))


def _egress_markdown(report: Mapping[str, Any], many: bool) -> list[str]:
    """What left each site as the server received it: per site its model updates, how many
    were DP-noised and how many masked, and the evaluation replies (neither)."""
    if not any("updates" in entry for entry in report["rounds"]):
        return []  # a report.json from before updates were recorded: no numbers to show
    counts = egress_counts(report)
    if not counts:
        return []
    total: Counter[str] = Counter()
    for c in counts.values():
        total.update(c)
    updates, dp, masked = total["updates"], total["dp_sgd"], total["masked"]
    lines = ["", "## What left each site", "",
             f"{updates} model update(s) reached the server from {len(counts)} site(s): "
             + _of(dp, updates, "trained with DP-SGD noise") + "; "
             + _of(masked, updates, "masked by secure aggregation")
             + (" (the server saw only their sum)" if masked else
                ", so the server saw each update on its own" if updates else "") + ". "
             + ("Each masked update also carried its site's own hospital-level noise share "
                "(privacy=site_dp): the sum the server unmasked was already noised. "
                if report.get("hospital_privacy") and masked else "")
             + f"The {total['evaluations']} evaluation repl"
             + ("y" if total["evaluations"] == 1 else "ies")
             + " carried metrics on the sites' test splits, neither noised nor masked.", "",
             "Each site logs every reply before it leaves (`<state-dir>/egress.jsonl`, with the "
             "same two facts per message; `python -m client.egress summarize LOG` reads it) "
             "under the content id (SHA-256) the server lists in report.json "
             "`rounds[].received`; report.json `rounds[].updates` holds each update's."]
    if many:
        return lines
    lines += ["", "| site | model updates sent | DP-SGD noised | secure-aggregation masked | "
              "evaluation replies |", "|---|---:|---:|---:|---:|"]
    for site, c in counts.items():
        lines.append(f"| {site} | {c['updates']} | {c['dp_sgd']} of {c['updates']} | "
                     f"{c['masked']} of {c['updates']} | {c['evaluations']} |")
    return lines


def _of(part: int, whole: int, what: str) -> str:
    if whole and part == whole:
        return f"all {what}" if whole > 1 else what
    return f"{'none' if part == 0 else f'{part} of {whole}'} {what}"


def _evaluated_on(run: Mapping[str, Any], *, short: bool = False) -> str:
    """What the global metrics were computed on, in words (``short``: a figure's title)."""
    pooled = run["global_evaluation"] == "pooled"
    pool = run.get("pooled_evaluation_sites")
    if pooled and pool is not None and len(pool) < run["num_hospitals"]:
        if short:
            return f"the test splits of {len(pool)} of {run['num_hospitals']} sites, pooled"
        return (f"the union of the test splits of {len(pool)} of the {run['num_hospitals']} "
                "sites (a seeded sample fixed for the run: `simulation.pooled_eval_sites`; "
                "report.json `run.pooled_evaluation_sites`)")
    if pooled:
        return "all sites' test splits, pooled" if short else "the union of all sites' test splits"
    return "each site's test split, example-weighted mean"


def _final_metrics_section(report: Mapping[str, Any], many: bool) -> list[str]:
    final, site_rows = report["final"], report.get("sites", {})
    lines = [
        "",
        "## Final metrics",
        "",
        f"*Global* = the final global model on {_evaluated_on(report['run'])}; *client mean* = "
        "unweighted mean over sites; per site = on that site's own test split. Averages over "
        "classes (balanced accuracy, AUROC, AUPRC, macro-F1) run over the classes present in "
        "that split; n/a = undefined there (AUROC with one class present), never a filled-in "
        "zero.",
        "",
        _EXAMPLES_NOTE,
        "",
        "| | train examples | test examples | rounds trained | "
        + " | ".join(HEADLINE_METRICS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(HEADLINE_METRICS),
    ]
    rows = [("**global**", "", final["global"].get("num_examples", ""), "", final["global"]),
            ("**client mean**", "", "", "", final["client_mean"])]
    if not many:
        rows += [(site, _count(site_rows.get(site, {}).get("num_examples")),
                  m.get("num_examples", ""), site_rows.get(site, {}).get("rounds_trained", ""),
                  m)
                 for site, m in final["sites"].items()]
    for name, train_n, test_n, trained, metrics in rows:
        values = " | ".join(_fmt(metrics.get(k)) for k in HEADLINE_METRICS)
        lines.append(f"| {name} | {_count(train_n)} | {_count(test_n)} | {trained} | "
                     f"{values} |")
    if many:
        lines += _sites_summary_markdown(report)
    return lines


# The two example counts, named the same in report.md and sites.csv.
_EXAMPLES_NOTE = (
    "*Train examples*: the training-split size a site sent with its last update (under DP the "
    "noisy count ñ it released, not its exact size; blank where none was sent: under secure "
    "aggregation it stays inside the masked sum; `train_examples` in sites.csv); *test "
    "examples*: the records of its own test split its final metrics were computed on "
    "(`test_examples` in sites.csv).")


def _count(value: Any) -> str:
    """An example count as a whole number; blank where there is none."""
    if value is None or value == "":
        return ""
    return str(int(round(float(value))))


def _skipped_records_markdown(report: Mapping[str, Any], many: bool) -> list[str]:
    skipped = {s: d["skipped"] for s, d in report.get("data", {}).items() if d["skipped"]}
    if skipped and many:
        totals: Counter[str] = Counter()
        for counts in skipped.values():
            totals.update(counts)  # update, not +: a reason counted 0 stays listed
        return ["", f"Records the loaders of {len(skipped)} sites left out (counted, not "
                "silently dropped): " + ", ".join(f"{n} {why}" for why, n in totals.items())
                + "; per site in report.json `data`."]
    if skipped:
        return ["", "Records the sites' loaders left out (counted, not silently dropped): "
                + "; ".join(f"{s}: " + ", ".join(f"{n} {why}" for why, n in d.items())
                            for s, d in skipped.items())]
    return []


def _rounds_section(report: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Rounds", ""]
    initial = report["initial"]["global"]
    if initial:
        lines.append(f"- round 0 (initial model): global loss {_fmt(initial.get('loss'))}, "
                     f"accuracy {_fmt(initial.get('accuracy'))}")
    return lines + [_round_line(r) for r in report["rounds"]]


def _round_line(r: Mapping[str, Any]) -> str:
    g = r["global"]
    line = (f"- round {r['round']}: global loss {_fmt(g.get('loss'))}, accuracy "
            f"{_fmt(g.get('accuracy'))}, AUROC {_fmt(g.get('auroc'))}; "
            f"{len(r['train'])}"
            + (f" of {r['asked']} asked" if r.get("asked") else "") + " sites trained")
    if r.get("duration_s") is not None:
        line += f" in {r['duration_s']:.1f} s"
    for key, label in (("declined", "declined"), ("refused", "refused"),
                       ("rejected", "update rejected")):
        if r.get(key):
            line += f"; {label}: " + _named(r[key])
    if r.get("secure_aggregation"):
        line += _secure_round_text(r["secure_aggregation"])
    if r.get("timed_out"):
        line += "; no answer in time: " + _named(r["timed_out"], ", ")
    if r.get("skipped"):
        line += f"; ROUND SKIPPED, global model unchanged: {r['skipped']}"
    if r["failures"]:
        line += "; failed: " + _named([f"{f['stage']} on node {f['node_id']}: {f['reason']}"
                                       for f in r["failures"]])
    return line


def _secure_round_text(secure: Mapping[str, Any]) -> str:
    return (f"; secure aggregation of {len(secure['aggregated'])} sites"
            + (f", dropped and recovered: {_named(secure['dropped'], ', ')}"
               if secure["dropped"] and not secure["aborted"] else "")
            + (f", ABORTED (nothing revealed): {secure['aborted']}"
               if secure["aborted"] else "")
            + (f", the aggregate failed the update checks: {secure['rejected']}"
               if secure.get("rejected") else ""))


# The metrics the baseline comparison shows: ranking quality, and the one a collapsed model fails.
BASELINE_METRICS = (("auroc", "AUROC"), ("balanced_accuracy", "balanced accuracy"))


def _baselines_markdown(report: Mapping[str, Any]) -> list[str]:
    """"Federated vs each hospital alone vs pooled": a table and the gap in plain words."""
    baselines = report.get("baselines")
    if not baselines:
        return []
    lines = ["", "## Federated vs each hospital alone vs pooled", ""]
    if not baselines.get("computed", True):
        return lines + [f"Baselines were not computed: {baselines['reason']}."]
    run, final = report["run"], report["final"]
    local, pooled = baselines.get("local"), baselines.get("pooled")
    config = run.get("config") or {}
    budget = (f" ({run['rounds']} rounds × {config['local_epochs']} local epochs, a fresh "
              "optimizer each round)" if "local_epochs" in config else "")
    lines.append(
        "Same initial model, model, training settings and budget of "
        f"{baselines['epochs']} epochs{budget} as the federation, "
        + ("with DP-SGD as the run" if run["privacy"] != "off" else "without DP, as the run")
        + ". " + ("*Alone*: each hospital trained only on its own training split, scored on its "
                  "own test split. " if local else "")
        + ("*Pooled*: one model trained on every hospital's training split together (possible "
           "only in simulation: the upper reference), scored on the same test pool as the "
           "federated global metrics and on each hospital's test split. " if pooled else "")
        + f"Computing them took {baselines['duration_s']:.1f} s.")
    models = [("federated", {"global": final["global"], "client_mean": final["client_mean"],
                             "sites": final["sites"]})]
    models += [(name, entry) for name, entry in (("alone", local), ("pooled", pooled)) if entry]
    header = [f"{label} {name}" for _, label in BASELINE_METRICS for name, _ in models]
    lines += ["", "| | test examples | " + " | ".join(header) + " |",
              "|---|---:|" + "---:|" * len(header)]

    def row(name: str, examples: Any, part: str, site: str | None = None) -> str:
        cells = []
        for metric, _ in BASELINE_METRICS:
            for model_name, entry in models:
                if part == "global" and model_name == "alone":
                    # no single model trained alone exists to score on the pool: the mean of
                    # each hospital's own model on its own test split stands in, marked
                    cells.append(_fmt(entry["client_mean"].get(metric)) + "†")
                    continue
                metrics = entry[part] if site is None else entry["sites"].get(site, {})
                cells.append(_fmt((metrics or {}).get(metric)))
        return f"| {name} | {examples} | " + " | ".join(cells) + " |"

    pool_examples = (pooled or {}).get("global", {}).get("num_examples", "")
    lines.append(row("**global**", pool_examples, "global"))
    lines.append(row("**client mean**", "", "client_mean"))
    sites = sorted(final["sites"])
    many = len(sites) > MANY_SITES
    if not many:
        for site in sites:
            lines.append(row(site, final["sites"][site].get("num_examples", ""), "sites", site))
    if local:
        lines += ["", "† alone has no single model to score on the pooled test set: the mean "
                  "over hospitals of each hospital's own model on its own test split."]
    if many:
        lines += _baseline_differences_markdown(final["sites"], local, pooled)
    lines.append("")
    lines += [_baseline_gap(label, metric, final, local, pooled)
              for metric, label in BASELINE_METRICS]
    privacy = _baseline_privacy(local, pooled)
    if privacy:
        lines += ["", privacy]
    return lines


def _gap(value: float, reference: float) -> str:
    difference = value - reference
    if abs(difference) < 0.0005:
        return "level with"
    return f"{abs(difference):.3f} {'above' if difference > 0 else 'below'}"


def _defined(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _baseline_gap(label: str, metric: str, final: Mapping[str, Any],
                  local: Mapping[str, Any] | None, pooled: Mapping[str, Any] | None) -> str:
    """One sentence per metric. Each comparison uses the same test records on both sides: the
    global pool against the pooled model, each hospital's own split against its own model."""
    parts = []
    federated = final["global"].get(metric)
    if pooled and _defined(federated) and _defined(pooled["global"].get(metric)):
        parts.append(f"on the pooled test set the federated model ({federated:.3f}) is "
                     f"{_gap(federated, pooled['global'][metric])} the model trained on all data "
                     f"pooled ({pooled['global'][metric]:.3f})")
    mean = final["client_mean"].get(metric)
    if local and _defined(mean) and _defined(local["client_mean"].get(metric)):
        pairs = [(m.get(metric), local["sites"].get(site, {}).get(metric))
                 for site, m in final["sites"].items()]
        pairs = [(f, a) for f, a in pairs if _defined(f) and _defined(a)]
        beats = sum(f > a for f, a in pairs)
        undefined = len(final["sites"]) - len(pairs)
        parts.append(f"on each hospital's own test split it averages {mean:.3f}, "
                     f"{_gap(mean, local['client_mean'][metric])} the hospitals' own models "
                     f"trained alone ({local['client_mean'][metric]:.3f}); it beats training "
                     f"alone at {beats} of {len(pairs)} hospitals"
                     + (f" ({undefined} have it undefined)" if undefined else ""))
    label = label[:1].upper() + label[1:]
    if not parts:
        return f"- **{label}**: undefined for the models compared (n/a above)."
    return f"- **{label}**: " + "; ".join(parts) + "."


def _baseline_differences_markdown(final_sites: Mapping[str, Mapping[str, Any]],
                                   local: Mapping[str, Any] | None,
                                   pooled: Mapping[str, Any] | None) -> list[str]:
    """Many sites: per-site differences (federated minus baseline) as quantiles over sites."""
    lines = ["", f"Per hospital ({len(final_sites)}), federated minus baseline on the "
             "hospital's own test split (above 0: federation better):", ""]
    lines += _quantile_header()
    for name, entry in (("alone", local), ("pooled", pooled)):
        if not entry:
            continue
        for metric, label in BASELINE_METRICS:
            differences = [m[metric] - entry["sites"][site][metric]
                           for site, m in final_sites.items()
                           if _defined(m.get(metric)) and site in entry["sites"]
                           and _defined(entry["sites"][site].get(metric))]
            lines.append(_quantile_row(f"{label}: federated − {name}", differences))
    return lines


def _baseline_privacy(local: Mapping[str, Any] | None, pooled: Mapping[str, Any] | None) -> str:
    """The baselines' own ε (their accountants'), when they trained with DP."""
    parts = []
    ledgers = [led for led in (local or {}).get("privacy", {}).values()
               if isinstance(led, Mapping) and led.get("dp")]
    epsilons = [led["epsilon"] for led in ledgers if _defined(led.get("epsilon"))]
    if epsilons:
        spread = (f"{min(epsilons):.2f}" if min(epsilons) == max(epsilons)
                  else f"{min(epsilons):.2f} to {max(epsilons):.2f}")
        parts.append(f"each hospital alone spent ε {spread} (δ as each site's own)")
    led = (pooled or {}).get("privacy") or {}
    if led.get("dp") and _defined(led.get("epsilon")):
        parts.append(f"the pooled model ε {led['epsilon']:.2f} at δ {led['delta']:.0e} over "
                     f"{pooled['num_train']} records")
    if not parts:
        return ""
    return ("Baselines' privacy (their own accountants, σ planned for the whole budget as a "
            "site plans it): " + "; ".join(parts) + ".")


def _quantile_row(name: str, values: Any, digits: int = 3) -> str:
    summary = site_summary.quantiles(values)
    cells = " | ".join("n/a" if summary[q] is None else f"{summary[q]:.{digits}f}"
                       for q, _ in site_summary.QUANTILES)
    return f"| {name} | {summary['n']} | {cells} |"


def _quantile_header() -> list[str]:
    names = [q for q, _ in site_summary.QUANTILES]
    return ["| | sites | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]


def _sites_summary_markdown(report: Mapping[str, Any]) -> list[str]:
    """Many sites: quantiles over sites and the worst sites instead of one row per site."""
    table = report["sites"]
    run = report["run"]
    evaluated = sum(1 for row in table.values() if row.get("final") is not None)
    lines = ["", f"### Across sites ({len(table)} sites in this run's rounds; {evaluated} "
             "evaluated in the final round)", "",
             "Final metrics over the sites evaluated in the final round; rounds trained over all "
             f"{len(table)} sites (asked to train or evaluated at least once).", ""]
    lines += _quantile_header()
    for name in HEADLINE_METRICS:
        lines.append(_quantile_row(name, site_summary.metric_values(table, name).values()))
    lines.append(_quantile_row("rounds trained", [r["rounds_trained"] for r in table.values()],
                               digits=1))
    if run["privacy"] != "off":
        lines.append(_quantile_row("ε spent", site_summary.epsilon_values(table).values()))
    never_asked = int(run["num_hospitals"]) - len(table)
    if never_asked > 0:
        lines += ["", f"{never_asked} of {run['num_hospitals']} sites were never sampled in any "
                  "round and appear in no table."]
    metric = site_summary.ranking_metric(table)
    if metric is not None:
        values = site_summary.metric_values(table, metric)
        undefined = evaluated - len(values)
        lines += ["", f"Worst {min(len(values), site_summary.WORST_SHOWN)} sites by {metric} "
                  "(lowest, final round)"
                  + (f"; {undefined} evaluated sites have it undefined" if undefined else "")
                  + ":", "",
                  "| site | " + metric + " | accuracy | train examples | test examples | "
                  "rounds trained |",
                  "|---|---:|---:|---:|---:|---:|"]
        for site, value in site_summary.extremes(values, highest=False):
            row = table[site]
            final = row["final"]
            lines.append(f"| {site} | {_fmt(value)} | {_fmt(final.get('accuracy'))} | "
                         f"{_count(row.get('num_examples'))} | "
                         f"{_count(final.get('num_examples'))} | {row['rounds_trained']} |")
    lines += ["", "Every site's participation, final metrics and privacy: `sites.csv` "
              "(one row per site) and report.json `sites`."]
    return lines


def _privacy_summary_markdown(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Many DP sites: ε quantiles and the sites that spent the most, not one row per site."""
    lines = list(_PRIVACY_EXPLANATION)
    epsilons = site_summary.epsilon_values(table)
    never_note = site_summary.NEVER_TRAINED
    never = sorted(s for s, row in table.items() if row.get("privacy") == never_note)
    missing = sorted(s for s, row in table.items()
                     if row.get("epsilon") is None and row.get("privacy") != never_note)
    lines += _quantile_header()
    lines.append(_quantile_row("ε spent", epsilons.values()))
    lines.append(_quantile_row("rounds trained", [r["rounds_trained"] for r in table.values()],
                               digits=1))
    if never:
        lines += ["", f"{len(never)} sites have no ε because they never trained (no records "
                  f"used): {shorten(never)}."]
    if missing:  # trained, yet no accountant number: say so rather than guess one
        lines += ["", f"**{len(missing)} sites trained but report no ε** (see `privacy` in "
                  f"sites.csv): {shorten(missing)}."]
    if epsilons:
        lines += ["", f"Highest ε ({min(len(epsilons), site_summary.WORST_SHOWN)} sites):", "",
                  "| site | ε spent | δ | steps | rounds trained |",
                  "|---|---:|---:|---:|---:|"]
        for site, eps in site_summary.extremes(epsilons, highest=True):
            row = table[site]
            lines.append(f"| {site} | {_fmt(eps)} | {row.get('delta') or 0:.1e} | "
                         f"{row.get('steps')} | {row['rounds_trained']} |")
    lines += ["", "Each site's ε: `sites.csv` and report.json `sites` / `privacy`; "
              "distribution: `plots/privacy_epsilon.png`."]
    return lines


# What (ε, δ) means, shown above the per-site table or the summary over sites.
_PRIVACY_EXPLANATION = [
    "Each hospital trained with DP-SGD (per-example gradient clipping + Gaussian noise) and",
    "accounted for its own privacy over every round it trained. **(ε, δ)-DP per patient "
    "record at each site** means: whether or not any one patient's record was in that site's",
    "training split, the probability of any outcome of the model updates the site sent (hence",
    "the aggregated and final model) changes by at most a factor e^ε, except with probability",
    "δ. It covers those updates, not everything a site sent: the lists below say what is and",
    "is not covered. Smaller ε is stronger; δ is set below 1/(number of the site's training",
    "records) so that it cannot cover leaking one record outright.",
    "",
]


def _privacy_markdown(privacy: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        *_PRIVACY_EXPLANATION,
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


# What each headline metric is, for axis labels: the unit or the range and its meaning.
METRIC_AXIS = {
    "loss": "cross-entropy loss (nats per example)",
    "accuracy": "accuracy (fraction correct, 0–1)",
    "auroc": "AUROC (0.5 = chance, 1 = perfect)",
}


def _dp_sites(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {s: led for s, led in report.get("privacy", {}).items() if led.get("dp")}


def build_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """File name -> matplotlib figure of every plot the report has (each titled, both axes
    labelled with their units); :func:`plot_report` saves them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    many = len(report.get("sites", {})) > MANY_SITES
    figures = {"global_metrics.png": _global_figure(plt, report)}
    for name in ("accuracy", "auroc", "loss"):
        figures[f"sites_{name}.png"] = (_site_distribution_figure(plt, rounds, name) if many
                                        else _site_lines_figure(plt, rounds, name))
    dp_sites = _dp_sites(report)
    if dp_sites:
        figures["privacy_epsilon.png"] = (_epsilon_histogram_figure(plt, report["sites"])
                                          if many else _epsilon_lines_figure(plt, dp_sites))
    figures["participation.png"] = _participation_figure(plt, report)
    return figures


def plot_report(report: Mapping[str, Any], plots_dir: Path) -> list[Path]:
    figures = build_figures(report)  # selects the file-only backend before pyplot loads
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    return [_save(plt, fig, plots_dir / name) for name, fig in figures.items()]


def _global_figure(plt: Any, report: Mapping[str, Any]) -> Any:
    from matplotlib.ticker import MaxNLocator

    rounds = report["rounds"]
    xs = [0] + [r["round"] for r in rounds]
    series = [report["initial"]["global"]] + [r["global"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes, ("loss", "accuracy", "auroc"), strict=True):
        ax.plot(xs, [s.get(name) if s.get(name) is not None else np.nan for s in series],
                marker="o")
        ax.set_title(f"global model: {name}")
        ax.set_xlabel("round (0 = initial model)")
        ax.set_ylabel(METRIC_AXIS[name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Global model on {_evaluated_on(report['run'], short=True)}", fontsize=10)
    return fig


def _site_lines_figure(plt: Any, rounds: list[Mapping[str, Any]], name: str) -> Any:
    from matplotlib.ticker import MaxNLocator

    sites = sorted({s for r in rounds for s in r["sites"]})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for site in sites:
        ys = [r["sites"].get(site, {}).get(name) for r in rounds]
        ax.plot([r["round"] for r in rounds], [np.nan if y is None else y for y in ys],
                marker=".", label=site)
    ax.set_title(f"{name} per site (each on its own test split)")
    ax.set_xlabel("round")
    ax.set_ylabel(METRIC_AXIS[name])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if 0 < len(sites) <= 12:
        ax.legend(fontsize=8)
    return fig


def _site_distribution_figure(plt: Any, rounds: list[Mapping[str, Any]], name: str) -> Any:
    """Median and p10–p90 band over the sites evaluated each round, with how many there were.

    With sampling each round evaluates different sites, so the count matters for reading the
    band: a band over 5 sites says less than one over 500.
    """
    from matplotlib.ticker import MaxNLocator

    xs, low, mid, high, counts = [], [], [], [], []
    for r in rounds:
        values = [m[name] for m in r["sites"].values()
                  if m.get(name) is not None and math.isfinite(m[name])]
        xs.append(r["round"])
        counts.append(len(values))
        q = np.percentile(values, [10, 50, 90]) if values else [np.nan] * 3
        low.append(q[0])
        mid.append(q[1])
        high.append(q[2])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.fill_between(xs, low, high, alpha=0.3, label="p10–p90 over sites")
    ax.plot(xs, mid, marker=".", label="median over sites")
    ax.set_title(f"{name} across sites (each on its own test split)")
    ax.set_xlabel("round")
    ax.set_ylabel(METRIC_AXIS[name])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    count_ax = ax.twinx()
    count_ax.plot(xs, counts, color="gray", linestyle=":", marker="x", label="sites evaluated")
    count_ax.set_ylabel("sites evaluated (count)")
    count_ax.set_ylim(bottom=0)
    count_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    count_ax.legend(fontsize=8, loc="upper right")
    return fig


def _budgets(ledgers: Iterable[Mapping[str, Any]]) -> list[float]:
    """The distinct privacy budgets (max ε) the sites enforce; empty when none has one."""
    return sorted({float(led["max_epsilon"]) for led in ledgers
                   if led.get("max_epsilon") is not None})


def _epsilon_lines_figure(plt: Any, dp_sites: Mapping[str, Mapping[str, Any]]) -> Any:
    """Each site's cumulative ε after each round it trained, and its budget where it has one
    (a line is promised in the legend only when one is drawn)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for site, led in dp_sites.items():
        eps = led.get("epsilon_per_round") or []
        ax.plot(range(1, len(eps) + 1), eps, marker=".", label=site)
    budgets = _budgets(dp_sites.values())
    for budget in budgets:
        ax.axhline(budget, linestyle=":", color="gray",
                   label=f"budget (max ε {budget:g})")
    deltas = {float(led["delta"]) for led in dp_sites.values() if led.get("delta") is not None}
    ax.set_title("privacy spent per site, cumulative"
                 + (f" (dotted: budget{'s' if len(budgets) > 1 else ''})" if budgets else ""))
    ax.set_xlabel("rounds the site trained")
    ax.set_ylabel("ε spent (privacy loss, unitless"
                  + (f"; {_delta_words(deltas)}" if deltas else "") + ")")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    longest = max([len(led.get("epsilon_per_round") or []) for led in dp_sites.values()] + [1])
    ax.set_xlim(0.5, longest + 0.5)
    top = max([e for led in dp_sites.values() for e in led.get("epsilon_per_round") or []]
              + budgets + [1.0])
    ax.set_ylim(0, top * 1.12)  # the budget line stays inside the axes
    ax.grid(alpha=0.3)
    if len(dp_sites) + len(budgets) <= 14:
        ax.legend(fontsize=8, loc="lower right")
    return fig


def _epsilon_histogram_figure(plt: Any, table: Mapping[str, Mapping[str, Any]]) -> Any:
    """Final ε across the sites that trained (sites that never trained have no ε)."""
    epsilons = list(site_summary.epsilon_values(table).values())
    budgets = _budgets(table.values())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(epsilons, bins=min(30, max(1, len(set(epsilons)))))
    for budget in budgets:
        ax.axvline(budget, linestyle=":", color="gray", label=f"budget (max ε {budget:g})")
    never = len(table) - len(epsilons)
    ax.set_title(f"final ε across {len(epsilons)} sites"
                 + (f" ({never} never trained: no ε)" if never else ""))
    ax.set_xlabel("ε spent by the site (privacy loss, unitless)")
    ax.set_ylabel("sites (count)")
    if budgets:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _participation_figure(plt: Any, report: Mapping[str, Any]) -> Any:
    """How many rounds each site trained: with sampling, not every site contributes equally."""
    from matplotlib.ticker import MaxNLocator

    table = report.get("sites", {})
    trained = [row["rounds_trained"] for row in table.values()]
    top = max([len(report["rounds"]), *trained, 1])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(trained, bins=np.arange(-0.5, top + 1.5, 1.0), rwidth=0.85)
    ax.set_title(f"rounds trained per site ({len(table)} sites in this run's rounds)")
    ax.set_xlabel("rounds trained (count)")
    ax.set_ylabel("sites (count)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    out_dir: Path,
    report: Mapping[str, Any],
    final_state_dict: Mapping[str, Any] | None,
) -> None:
    """Write report.json, report.md, sites.csv, plots/ and model.pt into ``out_dir``."""
    import io

    import torch

    out_dir = Path(out_dir)
    plot_report(report, out_dir / "plots")
    # every site's row, for a spreadsheet: report.md summarizes when there are many
    write_atomically(out_dir / "sites.csv",
                     site_summary.sites_csv(report.get("sites", {})).encode())
    if final_state_dict is not None:
        buffer = io.BytesIO()
        cfg = report["run"]["config"]
        torch.save({"state_dict": dict(final_state_dict), "model": cfg["model"],
                    "task": cfg["task"]}, buffer)
        write_atomically(out_dir / "model.pt", buffer.getvalue())
    write_atomically(out_dir / "report.md", render_markdown(report).encode())
    # report.json last: its presence means the run's outputs are complete.
    write_atomically(out_dir / "report.json", json.dumps(report, indent=2).encode())
