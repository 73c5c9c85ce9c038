"""One row per site: participation, final metrics and privacy, and summaries of those rows.

At a handful of hospitals the report lists every site; at hundreds or thousands it cannot stay
readable that way. This module builds the full per-site table (report.json ``sites`` and
``sites.csv``) and the summaries report.md shows instead: quantiles over sites and the worst
sites. It works on the report's own ``rounds``/``final``/``privacy`` sections, so every number
in the summary can be traced back to report.json.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from server.history import is_node_label

HEADLINE_METRICS = ("loss", "accuracy", "balanced_accuracy", "auroc", "auprc", "macro_f1")

# Above this many sites report.md summarizes (quantiles, worst sites) instead of listing each.
MANY_SITES = 20
# How many names a round line lists (declined, timed out, ...) before "and N more".
NAMES_SHOWN = 5
WORST_SHOWN = 5

QUANTILES = (("min", 0.0), ("p10", 10.0), ("median", 50.0), ("p90", 90.0), ("max", 100.0))

NEVER_TRAINED = "never trained: no records used"
NO_LEDGER = "trained but no privacy ledger received"


# train_examples: the training-split size the site sent with its last update (under DP the
# noisy count it released); test_examples: the test records its final metrics were computed on.
# report.md's final-metrics table names its columns the same way.
CSV_COLUMNS = ("site", "rounds_asked", "rounds_trained", "last_round_trained", "train_examples",
               "test_examples", *(f"final_{m}" for m in HEADLINE_METRICS),
               "dp", "epsilon", "delta", "steps", "max_epsilon", "privacy")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sites_asked(round_entry: Mapping[str, Any]) -> set[str]:
    """Sites asked to train in a round that answered or timed out (failures carry no site id)."""
    asked = (set(round_entry.get("train", {})) | set(round_entry.get("declined", {}))
             | set(round_entry.get("refused", {})) | set(round_entry.get("rejected", {})))
    # a site that timed out before it ever answered is known only by its node id: no row
    asked |= {s for s in round_entry.get("timed_out", []) if not is_node_label(s)}
    return asked


def site_table(
    rounds: Sequence[Mapping[str, Any]],
    final_sites: Mapping[str, Mapping[str, Any]],
    privacy: Mapping[str, Mapping[str, Any]],
    *,
    dp: bool,
) -> dict[str, dict[str, Any]]:
    """report.json ``sites``: per site id, its participation, final metrics and privacy.

    ``rounds`` are report.json rounds (train metrics with ``num_examples``); ``privacy`` is
    report.json ``privacy`` (each DP site's latest ledger). A DP-off site gets ``dp: false`` and
    no epsilon at all (never ε = 0); a DP site that never trained gets ``epsilon: null`` and a
    note saying why, not an ε it did not spend.
    """
    known: set[str] = set(final_sites) | set(privacy)
    for entry in rounds:
        known |= sites_asked(entry) | set(entry.get("sites", {}))
    table: dict[str, dict[str, Any]] = {
        site: {"rounds_asked": 0, "rounds_trained": 0, "last_round_trained": None,
               "num_examples": None}
        for site in sorted(known)
    }
    for entry in sorted(rounds, key=lambda r: r["round"]):
        for site in sites_asked(entry):
            table[site]["rounds_asked"] += 1
        for site, metrics in entry.get("train", {}).items():
            row = table[site]
            row["rounds_trained"] += 1
            row["last_round_trained"] = entry["round"]
            # under secure aggregation the count stays inside the masked sum: the 0 the round
            # records is no count the site sent, so the row says none (null, a blank cell)
            row["num_examples"] = (None if entry.get("secure_aggregation") is not None
                                   else metrics.get("num_examples", row["num_examples"]))
    for site, row in table.items():
        final = final_sites.get(site)
        row["final"] = dict(final) if final is not None else None
        row.update(_site_privacy(privacy.get(site), row["rounds_trained"], dp=dp))
    return table


def _site_privacy(ledger: Mapping[str, Any] | None, rounds_trained: int, *, dp: bool
                  ) -> dict[str, Any]:
    if not dp:
        return {"dp": False}
    budget = {"max_epsilon": ledger.get("max_epsilon")} if ledger is not None else {}
    if ledger is not None and (ledger.get("steps") or 0) > 0:
        return {"dp": True, "epsilon": ledger.get("epsilon"), "delta": ledger.get("delta"),
                "steps": ledger.get("steps"), **budget}
    # Zero DP-SGD steps: the site used none of its records, so there is no ε to report (the
    # accountant's 0.0 for an empty history would read like a privacy claim about training).
    note = (NEVER_TRAINED if rounds_trained == 0 else NO_LEDGER if ledger is None
            else "trained but its ledger records no DP-SGD steps")
    return {"dp": True, "epsilon": None, "privacy": note, **budget}


def quantiles(values: Iterable[float]) -> dict[str, float | int | None]:
    """min, p10, median, p90, max (numpy's linear interpolation) and n over finite values."""
    finite = np.array([float(v) for v in values if _finite(v)], dtype=float)
    summary: dict[str, float | int | None] = {"n": int(finite.size)}
    for name, q in QUANTILES:
        summary[name] = float(np.percentile(finite, q)) if finite.size else None
    return summary


def metric_values(table: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, float]:
    """Site -> final value of ``metric``, for the sites where it is defined."""
    out = {}
    for site, row in table.items():
        value = (row.get("final") or {}).get(metric)
        if _finite(value):
            out[site] = float(value)
    return out


def epsilon_values(table: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {site: float(row["epsilon"]) for site, row in table.items()
            if _finite(row.get("epsilon"))}


def ranking_metric(table: Mapping[str, Mapping[str, Any]]) -> str | None:
    """AUROC ranks the sites; accuracy where no site has a defined AUROC (e.g. one class)."""
    for metric in ("auroc", "accuracy"):
        if metric_values(table, metric):
            return metric
    return None


def extremes(values: Mapping[str, float], *, highest: bool, n: int = WORST_SHOWN
             ) -> list[tuple[str, float]]:
    """The ``n`` sites with the lowest (or highest) value; ties broken by site id."""
    sign = -1.0 if highest else 1.0
    return sorted(values.items(), key=lambda item: (sign * item[1], item[0]))[:n]


def shorten(names: Sequence[str], limit: int = NAMES_SHOWN, sep: str = ", ") -> str:
    """``a, b, c, d, e and 7 more``: a round line stays one readable line at 1000 sites."""
    names = list(names)
    shown = sep.join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def sites_csv(table: Mapping[str, Mapping[str, Any]]) -> str:
    """sites.csv: one row per site, ``CSV_COLUMNS``; an undefined value is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for site, row in table.items():
        final = row.get("final") or {}
        flat = {"site": site, **{k: v for k, v in row.items() if k != "final"},
                "train_examples": _whole(row.get("num_examples")),
                "test_examples": _whole(final.get("num_examples")),
                **{f"final_{m}": final.get(m) for m in HEADLINE_METRICS}}
        writer.writerow(["" if flat.get(col) is None else _csv_cell(flat[col])
                         for col in CSV_COLUMNS])
    return buffer.getvalue()


def _whole(count: Any) -> int | None:
    """An example count as a whole number (a DP site's noisy count ñ arrives as a float)."""
    return int(round(float(count))) if _finite(count) else None


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value
