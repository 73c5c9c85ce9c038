"""The report at hundreds of sites: participation per site, summaries instead of 300 rows."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest

from server.history import RunHistory
from server.report import build_report, write_report
from server.settings import compose
from server.site_summary import NEVER_TRAINED, quantiles

NUM_SITES, ROUNDS = 300, 5
SITES = [f"hospital_{i:03d}" for i in range(NUM_SITES)]
DELTA = 1e-5


@dataclass
class Truth:
    """What the test put into the history, counted independently of the report code."""

    trained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SITES, 0))
    asked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SITES, 0))
    last_trained: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    declined_only: str = ""  # a DP site that was asked, declined every time, never trained
    final: dict[str, dict[str, float]] = field(default_factory=dict)


def _metrics(rng: np.random.Generator, undefined_auroc: bool) -> dict[str, float]:
    return {"num-examples": float(rng.integers(20, 200)), "loss": float(rng.uniform(0.2, 1.5)),
            "accuracy": float(rng.uniform(0.4, 0.95)),
            "balanced_accuracy": float(rng.uniform(0.4, 0.95)),
            "auroc": float("nan") if undefined_auroc else float(rng.uniform(0.45, 0.99)),
            "auprc": float(rng.uniform(0.2, 0.9)), "macro_f1": float(rng.uniform(0.3, 0.9))}


def _ledger(steps: int, epsilon: float, trained: int, declined: int) -> dict:
    return {"accountant": "rdp", "delta": DELTA, "epsilon": epsilon, "noise_multiplier": 1.1,
            "sample_rate": 0.02, "steps": steps, "rounds_trained": trained,
            "rounds_declined": declined, "epsilon_per_round": [], "max_epsilon": 8.0}


def _history(dp: bool, seed: int = 0) -> tuple[RunHistory, Truth]:
    """Partial participation: each round 10–20 sites train, a few decline or time out."""
    rng = np.random.default_rng(seed)
    truth = Truth(declined_only=SITES[-1])
    history = RunHistory(initial_global={"loss": 1.0, "accuracy": 0.5})
    declined_count: dict[str, int] = dict.fromkeys(SITES, 0)
    pool = SITES[:-1]  # the last site only ever declines
    for rnd in range(1, ROUNDS + 1):
        record = history.round(rnd)
        n_train, n_declined = int(rng.integers(10, 21)), int(rng.integers(5, 9))
        chosen = list(rng.choice(pool, size=n_train + n_declined + 2, replace=False))
        trained, declined, timed_out = chosen[:n_train], chosen[n_train:-2], chosen[-2:]
        declined.append(truth.declined_only)
        for site in trained:
            examples = int(rng.integers(50, 500))
            record.train[site] = {"num-examples": float(examples), "train_loss": 0.5}
            truth.trained[site] += 1
            truth.last_trained[site] = rnd
            truth.examples[site] = examples
        for site in declined:
            record.declined[site] = "above this site's budget"
            declined_count[site] += 1
        record.timed_out = sorted(timed_out) + ["node 987654"]  # never answered: no site id
        record.failures = [{"stage": "train", "node_id": 4242, "reason": "boom"}]
        for site in chosen + [truth.declined_only]:
            truth.asked[site] += 1
        record.asked = len(chosen) + 2
        record.started_at, record.duration_s = 1.7e9 + 60 * rnd, 12.5 + rnd
        if dp:
            for site in [*trained, *declined]:  # declined sites report their ledger too
                steps = 10 * truth.trained[site]
                eps = float(0.4 * truth.trained[site] + rng.uniform(0, 0.3)) if steps else 0.0
                record.privacy[site] = _ledger(steps, eps, truth.trained[site],
                                               declined_count[site])
                if steps:
                    truth.epsilon[site] = eps
        # sampled evaluation in early rounds; every site evaluates the final model
        evaluated = SITES if rnd == ROUNDS else rng.choice(SITES, size=60, replace=False)
        record.sites = {str(s): _metrics(rng, undefined_auroc=i % 9 == 0)
                        for i, s in enumerate(evaluated)}
        record.global_metrics = {"loss": 0.8 - 0.05 * rnd, "accuracy": 0.7, "auroc": 0.8}
    truth.final = history.rounds[ROUNDS].sites
    return history, truth


def _cfg(dp: bool) -> dict:
    return compose([f"num_hospitals={NUM_SITES}", f"rounds={ROUNDS}",
                    *(["privacy=dp"] if dp else [])])


@pytest.fixture(scope="module", params=[False, True], ids=["dp_off", "dp"])
def written(request, tmp_path_factory):
    dp = request.param
    history, truth = _history(dp)
    report = build_report(_cfg(dp), history, duration_s=3.0, global_evaluation="pooled")
    out = tmp_path_factory.mktemp("dp" if dp else "off")
    write_report(out, report, None)
    return dp, truth, report, out


def test_participation_per_site_is_what_happened(written):
    _, truth, report, _ = written
    sites = report["sites"]
    took_part = {s for s in SITES if truth.asked[s]}
    assert set(sites) == took_part | set(truth.final)  # "node 987654" is not a site
    for site in sites:
        row = sites[site]
        assert row["rounds_trained"] == truth.trained[site], site
        assert row["rounds_asked"] == truth.asked[site], site
        assert row["last_round_trained"] == truth.last_trained.get(site), site
        assert row["num_examples"] == truth.examples.get(site), site
        if site in truth.final:
            assert row["final"]["accuracy"] == pytest.approx(truth.final[site]["accuracy"])
        else:
            assert row["final"] is None
    for r in report["rounds"]:
        assert r["asked"] >= len(r["train"]) and r["duration_s"] == 12.5 + r["round"]
        assert r["started_at"] == 1.7e9 + 60 * r["round"]
    json.dumps(report, allow_nan=False)


def test_privacy_per_site_never_reports_epsilon_for_no_training(written):
    dp, truth, report, _ = written
    sites = report["sites"]
    if not dp:
        assert all(row["dp"] is False and "epsilon" not in row for row in sites.values())
        return
    for site, row in sites.items():
        assert row["dp"] is True
        if site in truth.epsilon:
            assert row["epsilon"] == pytest.approx(truth.epsilon[site]) and row["steps"] > 0
        else:  # declined every round, or only timed out: it used no records
            assert row["epsilon"] is None and row["privacy"] == NEVER_TRAINED, site
    assert sites[truth.declined_only]["rounds_asked"] == ROUNDS
    assert sites[truth.declined_only]["epsilon"] is None


def _md_table_row(md: str, label: str, section: str = "") -> list[str]:
    """The cells after the label of the first table row ``label`` after ``section``."""
    rows = md[md.index(section):].splitlines()
    row = next(line for line in rows if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_markdown_summarizes_with_quantiles_that_match_numpy(written):
    dp, truth, report, out = written
    md = (out / "report.md").read_text()
    assert len(md.splitlines()) < 150
    assert "sites.csv" in md
    named = {s for s in SITES if re.search(rf"\b{s}\b", md)}
    assert len(named) <= 60  # worst sites and a few names per round line, never all 300
    accuracies = [m["accuracy"] for m in truth.final.values()]
    expected = np.percentile(accuracies, [0, 10, 50, 90, 100])
    assert quantiles(accuracies)["p10"] == pytest.approx(expected[1])
    cells = _md_table_row(md, "accuracy")
    assert int(cells[0]) == len(accuracies)
    assert [float(c) for c in cells[1:]] == pytest.approx(list(expected), abs=5e-4)
    trained = [truth.trained[s] for s in report["sites"]]
    cells = _md_table_row(md, "rounds trained")
    assert [float(c) for c in cells[1:]] == pytest.approx(
        list(np.percentile(trained, [0, 10, 50, 90, 100])), abs=5e-4)
    # round lines: a few names, then how many more
    first = report["rounds"][0]
    line = next(x for x in md.splitlines() if x.startswith("- round 1:"))
    assert f"and {len(first['declined']) - 5} more" in line
    assert "node 4242" in line and line.count("hospital_") <= 5 + len(first["timed_out"])
    if dp:
        eps = list(truth.epsilon.values())
        cells = _md_table_row(md, "ε spent")
        assert int(cells[0]) == len(eps)
        assert [float(c) for c in cells[1:]] == pytest.approx(
            list(np.percentile(eps, [0, 10, 50, 90, 100])), abs=5e-4)
        never = sum(1 for s in SITES if s not in truth.epsilon)
        assert f"{never} sites have no ε because they never trained" in md
    else:
        assert "ε" not in md and "epsilon" not in md.lower()


def test_worst_sites_are_the_true_worst(written):
    dp, truth, _, out = written
    md = (out / "report.md").read_text()
    defined = {s: m["auroc"] for s, m in truth.final.items() if not math.isnan(m["auroc"])}
    worst = sorted(defined, key=defined.get)[:5]
    section = md[md.index("Worst 5 sites by auroc"):]
    listed = re.findall(r"^\| (hospital_\d+) \|", section, flags=re.MULTILINE)[:5]
    assert listed == worst
    if dp:
        highest = sorted(truth.epsilon, key=truth.epsilon.get, reverse=True)[:5]
        section = md[md.index("Highest ε"):]
        assert re.findall(r"^\| (hospital_\d+) \|", section, flags=re.MULTILINE)[:5] == highest


def test_sites_csv_has_every_site(written):
    dp, truth, report, out = written
    with (out / "sites.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["sites"]) == NUM_SITES
    by_site = {row["site"]: row for row in rows}
    for site in SITES:
        row = by_site[site]
        assert int(row["rounds_trained"]) == truth.trained[site]
        assert int(row["rounds_asked"]) == truth.asked[site]
        assert row["dp"] == ("true" if dp else "false")
        if dp and site in truth.epsilon:
            assert float(row["epsilon"]) == pytest.approx(truth.epsilon[site])
        else:
            assert row["epsilon"] == ""  # no number where no ε was spent, or no DP at all
        if site in truth.final:
            assert float(row["final_accuracy"]) == pytest.approx(truth.final[site]["accuracy"])
    # outputs complete: report.json is written last and the plots summarize, not one line each
    assert (out / "report.json").stat().st_mtime_ns >= (out / "sites.csv").stat().st_mtime_ns
    for name in ("participation.png", "sites_auroc.png",
                 *(["privacy_epsilon.png"] if dp else [])):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_few_sites_keep_one_row_each_with_rounds_trained(tmp_path):
    history = RunHistory()
    for rnd in (1, 2, 3):
        record = history.round(rnd)
        record.train = {"hospital_a": {"num-examples": 30.0}}
        if rnd == 2:
            record.train["hospital_b"] = {"num-examples": 12.0}
        record.declined = {} if rnd == 2 else {"hospital_b": "above this site's budget"}
        record.privacy = {"hospital_a": _ledger(10 * rnd, 0.5 * rnd, rnd, 0)}
        record.timed_out = ["hospital_c"]  # asked every round, never answered
        record.sites = {s: _metrics(np.random.default_rng(rnd), False)
                        for s in ("hospital_a", "hospital_b", "hospital_c")}
    report = build_report(compose(["privacy=dp"]), history, duration_s=1.0,
                          global_evaluation="pooled")
    write_report(tmp_path, report, None)
    md = (tmp_path / "report.md").read_text()
    assert "| train examples | test examples | rounds trained |" in md
    rows = [_md_table_row(md, s, "## Final metrics")
            for s in ("hospital_a", "hospital_b", "hospital_c")]
    assert [row[2] for row in rows] == ["3", "1", "0"]  # rounds trained
    # train examples: what each site sent with its last update; test: its final evaluation's
    assert [row[0] for row in rows] == ["30", "12", ""]
    assert [row[1] for row in rows] == [str(int(report["final"]["sites"][s]["num_examples"]))
                                        for s in ("hospital_a", "hospital_b", "hospital_c")]
    sites = report["sites"]
    assert sites["hospital_a"]["epsilon"] == pytest.approx(1.5)
    assert sites["hospital_b"]["privacy"] == "trained but no privacy ledger received"
    assert sites["hospital_c"] == {**sites["hospital_c"], "rounds_asked": 3, "rounds_trained": 0,
                                   "epsilon": None, "privacy": NEVER_TRAINED}
    assert "No ε for hospital_c: never trained" in md
    assert (tmp_path / "plots" / "participation.png").is_file()
