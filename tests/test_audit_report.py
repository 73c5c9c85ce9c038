"""audit.md as a privacy officer reads it: the opening sentence, and plots that hide nothing."""

from __future__ import annotations

import math

import matplotlib
import pytest

from simulations.audit.lower_bound import AuditResult
from simulations.audit.membership import MembershipResult
from simulations.audit.report import (
    AuditReport,
    CanaryCheck,
    epsilon_figure,
    opening_sentence,
    roc_figure,
    write_audit_report,
)

matplotlib.use("Agg")

JARGON = ("Bonferroni", "TPR", "FPR", "canar", "LiRA", "white-box")


def _bound(eps: float) -> AuditResult:
    return AuditResult(epsilon_lb=eps, m=500, guesses=100, correct=70, delta=1e-5,
                       confidence=0.95, grid=(100,), bounds=(eps,),
                       epsilon_lb_best_uncorrected=eps)


def _membership(auc: float) -> MembershipResult:
    return MembershipResult(attack="loss", members=40, non_members=40, auc=auc,
                            tpr_at_fpr={"0.001": 0.0, "0.01": 0.05},
                            fpr=[0.0, 0.5, 1.0], tpr=[0.0, 0.6, 1.0])


def _report(claimed: float | None, bounds: tuple[float, float]) -> AuditReport:
    run = {"task": "tabular", "privacy": "off" if claimed is None else "dp",
           "auditing_site": "hospital_01", "accountant_epsilon": claimed,
           "delta": 1e-5}
    return AuditReport(
        canaries=[CanaryCheck("hospital_01", "white-box", _bound(bounds[0]), claimed),
                  CanaryCheck("hospital_01", "black-box", _bound(bounds[1]), claimed)],
        membership={"hospital_01": [_membership(0.53)]}, run=run)


def test_a_passing_dp_audit_opens_with_the_claim_and_no_problem_found(tmp_path):
    report = _report(1.234, (0.41, 0.0))
    write_audit_report(report, tmp_path)
    md = (tmp_path / "audit.md").read_text().splitlines()
    assert md[0] == "# Privacy audit" and md[2] == opening_sentence(report)
    first = md[2]
    assert first.startswith("This audit attacked a federated tabular run with differential "
                            "privacy, in which each patient record in hospital_01's training "
                            "data is protected at ε = 1.23 (δ = 1e-05) according to that "
                            "hospital's privacy accountant")
    assert "found no sign that the protection is weaker than claimed" in first
    assert not any(word in first for word in JARGON)
    # the jargon is still there, explained, below
    text = "\n".join(md)
    assert "Bonferroni correction" in text and "TPR @ FPR 0.1 %: the share of members" in text


def test_a_failing_dp_audit_says_it_found_a_problem_first():
    first = opening_sentence(_report(1.0, (2.42, 0.3)))
    assert "ε = 1.00" in first and "FOUND A PROBLEM" in first
    assert "do not rely on this protection" in first


def test_an_audit_without_dp_says_nothing_protected_the_records_and_never_epsilon_zero():
    first = opening_sentence(_report(None, (3.1, 0.2)))
    assert "without differential privacy, so nothing protected the patient records in " \
           "hospital_01's training data" in first
    assert "a privacy loss of at least ε = 3.10" in first  # what was measured, as measured
    assert "scored 0.53 (0.5 is a coin flip" in first
    assert "ε = 0" not in first and "found no sign" not in first


def test_the_epsilon_plot_labels_every_bar_and_keeps_its_legend_off_the_bars():
    fig = epsilon_figure(_report(None, (0.0, 0.0)).canaries
                         + _report(2.0, (0.0, 0.4)).canaries)
    (ax,) = fig.axes
    assert ax.get_title() and "ε" in ax.get_ylabel() and ax.get_xlabel()
    labels = [t.get_text() for t in ax.texts]
    # zero bounds are shown as numbers, not as missing bars; no claim without DP says so
    assert labels.count("0.00") == 3 and labels.count("no DP") == 2
    assert labels.count("2.00") == 2 and "0.40" in labels
    left, right = ax.get_xlim()
    assert all(left < t.xy[0] < right for t in ax.texts if t.get_text() == "no DP")
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the axes: it covers no bar
    assert math.isclose(ax.get_ylim()[0], 0.0) and ax.get_ylim()[1] > 2.0


def test_the_membership_plot_says_what_it_shows():
    fig = roc_figure({"hospital_01": [_membership(0.6)]})
    (ax,) = fig.axes
    assert ax.get_title() == "Membership inference on the final global model"
    assert "false positive rate" in ax.get_xlabel() and "log scale" in ax.get_xlabel()
    assert "true positive rate" in ax.get_ylabel()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
