"""report.md as a privacy officer reads it: the opening sentence, ε in words, what left each
site, example counts named alike in report.md and sites.csv, and plots that say what they show."""

from __future__ import annotations

import csv
import math

import pytest

from server.history import RunHistory
from server.report import build_figures, build_report, opening_sentence, render_markdown
from server.settings import compose
from server.site_summary import sites_csv

SITES = ("hospital_01", "hospital_02")
EVAL = {"num-examples": 16.0, "loss": 0.5, "accuracy": 0.8, "balanced_accuracy": 0.7,
        "auroc": 0.9, "auprc": 0.85, "macro_f1": 0.75}
TRAIN_SIZE = {"hospital_01": 41.0, "hospital_02": 23.0}


def _ledger(epsilons: list[float], *, budget: float | None = None, declined: int = 0) -> dict:
    return {"accountant": "prv", "delta": 1e-5, "epsilon": epsilons[-1],
            "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 4 * len(epsilons),
            "rounds_trained": len(epsilons), "rounds_declined": declined,
            "epsilon_per_round": epsilons, "max_epsilon": budget}


def _history(ledgers: dict[str, dict] | None, *, secure: bool = False) -> RunHistory:
    """Two rounds, both sites train and evaluate; ``ledgers``: each site's ledger per round
    (None: no DP)."""
    history = RunHistory(initial_global={"loss": 0.9, "accuracy": 0.5})
    for rnd in (1, 2):
        record = history.round(rnd)
        record.train = {s: {"num-examples": TRAIN_SIZE[s]} for s in SITES}
        record.sites = {s: dict(EVAL) for s in SITES}
        record.global_metrics = {"loss": 0.6, "accuracy": 0.7, "auroc": 0.8}
        record.received = {s: {"train": f"{rnd}{s}t", "evaluate": f"{rnd}{s}e"} for s in SITES}
        if ledgers is not None:
            record.privacy = {s: {**led, "epsilon_per_round": led["epsilon_per_round"][:rnd],
                                  "epsilon": led["epsilon_per_round"][rnd - 1],
                                  "steps": 4 * rnd}
                              for s, led in ledgers.items()}
        if secure:
            record.secure_aggregation = {"aggregated": list(SITES), "dropped": [],
                                         "aborted": None}
    return history


def _report(overrides: list[str], history: RunHistory) -> dict:
    return build_report(compose(["task=tabular", "num_hospitals=2", *overrides]), history,
                        duration_s=1.0, global_evaluation="pooled")


def _opening(md: str) -> str:
    """The first paragraph after the title."""
    lines = md.splitlines()
    assert lines[0].startswith("# medsilo run") and lines[1] == ""
    return lines[2]


def test_a_dp_run_opens_with_what_was_protected_at_the_accountants_epsilon():
    report = _report(["privacy=dp"], _history({"hospital_01": _ledger([1.234, 2.345]),
                                              "hospital_02": _ledger([1.5, 3.456])}))
    md = render_markdown(report)
    first = _opening(md)
    assert first == opening_sentence(report)
    assert first.startswith("This run trained one tabular model across 2 hospitals with "
                            "differential privacy: each patient record in a hospital's "
                            "training data was protected")
    # the largest ε any site's accountant reported, with δ; never a constant from config
    assert "at most ε = 3.46 (δ = 1e-05" in first and "8.00" not in first
    assert "the server saw each hospital's model update on its own" in first
    assert "budget" not in first  # no site set one
    for jargon in ("Bonferroni", "TPR", "FPR", "Rényi", "PRV"):
        assert jargon not in first


def test_a_run_without_dp_says_so_and_never_shows_an_epsilon():
    report = _report(["secagg=on"], _history(None, secure=True))
    first = _opening(render_markdown(report))
    assert "without differential privacy" in first
    assert "nothing limits what the model" in first
    assert "ε" not in first and "epsilon" not in first.lower() and "= 0" not in first
    assert "the server saw only the sum of the hospitals' model updates" in first


def test_a_budget_is_named_and_so_are_the_sites_that_declined_to_keep_it():
    within = _report(["privacy=dp"], _history({
        "hospital_01": _ledger([2.0, 3.9], budget=4.0, declined=1),
        "hospital_02": _ledger([1.0, 2.0], budget=4.0)}))
    first = opening_sentence(within)
    assert "at most ε = 3.90" in first
    assert "within each hospital's budget of ε = 4.00" in first
    assert "1 hospital(s) declined rounds to stay within it: hospital_01" in first
    over = _report(["privacy=dp"], _history({
        "hospital_01": _ledger([2.0, 4.5], budget=4.0), "hospital_02": _ledger([1.0, 2.0])}))
    first = opening_sentence(over)
    assert "ABOVE the budget at 1 hospital(s) (hospital_01: budget ε = 4.00)" in first
    assert "within" not in first


def test_epsilon_is_explained_with_the_runs_own_number_and_delta():
    report = _report(["privacy=dp"], _history({"hospital_01": _ledger([1.0, 2.3]),
                                              "hospital_02": _ledger([1.0, 2.0])}))
    md = render_markdown(report)
    meaning = next(line for line in md.splitlines() if line.startswith("**What ε"))
    factor = math.exp(2.3)
    assert meaning.startswith("**What ε = 2.30 means.**")
    assert f"rise at most e^ε ≈ {factor:.3g}-fold" in meaning  # 9.97
    assert f"at most {factor / (1 + factor):.2%} sure" in meaning  # 50:50 -> 90.88 %
    assert "δ = 1e-05" in meaning and "e^ε·f + δ" in meaning
    off = render_markdown(_report([], _history(None)))
    assert "**What ε" not in off


def test_the_report_says_per_site_whether_each_update_was_noised_and_masked():
    dp = _report(["privacy=dp"], _history({s: _ledger([1.0, 2.0]) for s in SITES}))
    assert dp["rounds"][0]["updates"]["hospital_01"] == {
        "dp_sgd": True, "noise_multiplier": 1.1, "masked": False}
    md = render_markdown(dp)
    section = md[md.index("## What left each site"):]
    assert ("4 model update(s) reached the server from 2 site(s): all trained with DP-SGD "
            "noise; none masked by secure aggregation, so the server saw each update on its "
            "own.") in section
    assert "| hospital_01 | 2 | 2 of 2 | 0 of 2 | 2 |" in section
    secure = _report([], _history(None, secure=True))
    assert secure["rounds"][1]["updates"]["hospital_02"] == {
        "dp_sgd": False, "noise_multiplier": None, "masked": True}
    section = render_markdown(secure)
    assert "none trained with DP-SGD noise; all masked by secure aggregation (the server saw " \
           "only their sum)" in section
    assert "| hospital_02 | 2 | 0 of 2 | 2 of 2 | 2 |" in section


def test_a_declined_round_sent_no_update():
    history = _history({s: _ledger([1.0, 2.0]) for s in SITES})
    history.rounds[2].declined = {"hospital_02": "above this site's budget"}
    report = _report(["privacy=dp"], history)
    assert set(report["rounds"][1]["updates"]) == {"hospital_01"}
    assert "| hospital_02 | 1 | 1 of 1 | 0 of 1 | 2 |" in render_markdown(report)


def test_train_and_test_examples_are_named_alike_in_report_md_and_sites_csv():
    report = _report([], _history(None))
    md = render_markdown(report)
    assert "| | train examples | test examples | rounds trained |" in md
    assert "| hospital_01 | 41 | 16 | 2 |" in md and "| hospital_02 | 23 | 16 | 2 |" in md
    rows = {row["site"]: row for row in csv.DictReader(sites_csv(report["sites"]).splitlines())}
    assert (rows["hospital_01"]["train_examples"], rows["hospital_01"]["test_examples"]) == (
        "41", "16")
    assert "num_examples" not in rows["hospital_01"]  # the ambiguous name is gone


def _labelled(fig) -> list:
    """Axes of ``fig`` that draw data, each checked for a title (its own or the figure's) and
    both axis labels."""
    axes = [ax for ax in fig.axes if ax.axison]
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    for ax in axes:
        assert ax.get_title() or title, fig
        assert ax.get_xlabel() and ax.get_ylabel()
    return axes


def test_every_plot_has_a_title_and_labelled_axes_and_a_budget_line_only_with_a_budget():
    budget = _report(["privacy=dp"], _history({s: _ledger([1.0, 2.0], budget=5.0)
                                                for s in SITES}))
    figures = build_figures(budget)
    assert set(figures) == {"global_metrics.png", "sites_accuracy.png", "sites_auroc.png",
                            "sites_loss.png", "privacy_epsilon.png", "participation.png"}
    for fig in figures.values():
        assert _labelled(fig)
    (ax,) = figures["privacy_epsilon.png"].axes
    assert "budget" in ax.get_title() and "ε spent" in ax.get_ylabel()
    assert "δ = 1e-05" in ax.get_ylabel()
    budget_lines = [line for line in ax.get_lines() if line.get_label().startswith("budget")]
    assert [tuple(line.get_ydata()) for line in budget_lines] == [(5.0, 5.0)]
    assert ax.get_ylim()[1] > 5.0  # the line is inside the axes, not on the frame
    assert "loss" in figures["global_metrics.png"].axes[0].get_ylabel()
    assert "nats" in figures["global_metrics.png"].axes[0].get_ylabel()

    none = build_figures(_report(["privacy=dp"], _history({s: _ledger([1.0, 2.0])
                                                          for s in SITES})))
    (ax,) = none["privacy_epsilon.png"].axes
    assert "budget" not in ax.get_title()
    assert not [line for line in ax.get_lines() if "budget" in line.get_label()]
    assert "privacy_epsilon.png" not in build_figures(_report([], _history(None)))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_budget_only_some_sites_set_is_said_to_be_theirs():
    report = _report(["privacy=dp"], _history({"hospital_01": _ledger([1.0, 2.0], budget=3.0),
                                              "hospital_02": _ledger([1.0, 2.5])}))
    first = opening_sentence(report)
    assert "within the budget of ε = 3.00 that 1 of the hospitals set" in first


def test_under_secure_aggregation_no_train_count_is_shown_as_zero():
    history = _history(None, secure=True)
    for record in history.rounds.values():  # the count stays inside the masked sum
        record.train = {s: {} for s in SITES}
    report = _report(["secagg=on"], history)
    assert report["sites"]["hospital_01"]["num_examples"] is None
    assert "| hospital_01 |  | 16 | 2 |" in render_markdown(report)
    rows = {row["site"]: row for row in csv.DictReader(sites_csv(report["sites"]).splitlines())}
    assert rows["hospital_01"]["train_examples"] == "" and rows["hospital_01"]["test_examples"] \
        == "16"
