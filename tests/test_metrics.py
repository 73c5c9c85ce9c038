"""Metric semantics a reader relies on: undefined is null, absent classes are not zeros, and a
model that predicts one class for everyone is called out, not reported as "accuracy 0.9"."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from client.evaluation import classification_metrics
from server.history import RunHistory
from server.report import build_report, render_markdown
from server.settings import compose


def _probs(predicted: list[int], num_classes: int) -> np.ndarray:
    """Confident probabilities whose argmax is ``predicted``."""
    probs = np.full((len(predicted), num_classes), 0.1 / (num_classes - 1))
    probs[np.arange(len(predicted)), predicted] = 0.9
    return probs


def test_a_perfect_site_missing_a_class_scores_one_not_a_zero_filled_average():
    labels = np.array([0, 1, 0, 1, 1])  # a 3-class task; class 2 is absent from this split
    m = classification_metrics(labels, _probs(labels.tolist(), 3), 3)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0  # was 2/3: the absent class counted as F1 = 0
    assert m["balanced_accuracy"] == 1.0
    assert m["collapsed"] == 0.0


def test_macro_f1_averages_the_present_classes_and_counts_absent_predictions_as_errors():
    labels = np.array([0, 0, 1, 1])
    predicted = [0, 2, 1, 1]  # one prediction of the absent class 2
    m = classification_metrics(labels, _probs(predicted, 3), 3)
    expected = skm.f1_score(labels, predicted, labels=[0, 1], average="macro")
    assert m["macro_f1"] == pytest.approx(expected)
    assert m["macro_f1"] < 1.0


def test_a_constant_predictor_is_flagged_collapsed():
    labels = np.array([0, 1, 1, 0, 1, 1])
    m = classification_metrics(labels, _probs([1] * 6, 2), 2)
    assert m["collapsed"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(4 / 6)  # only the majority share


def test_one_class_present_is_not_collapse_and_its_auroc_is_undefined():
    labels = np.zeros(4, dtype=int)
    m = classification_metrics(labels, _probs([0, 0, 0, 0], 2), 2)
    assert m["collapsed"] == 0.0  # nothing to tell apart: predicting it is right
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0


def _history(global_collapsed: float, site_collapsed: float) -> RunHistory:
    history = RunHistory(initial_global={"loss": 0.7, "accuracy": 0.5})
    record = history.round(1)
    site = {"num-examples": 10.0, "accuracy": 0.6, "balanced_accuracy": 0.5, "auroc": 0.7,
            "collapsed": site_collapsed}
    record.sites = {"hospital_01": dict(site), "hospital_02": {**site, "collapsed": 0.0}}
    record.global_metrics = {"loss": 0.69, "accuracy": 0.6, "balanced_accuracy": 0.5,
                             "collapsed": global_collapsed}
    return history


def test_report_says_loudly_when_the_global_model_collapsed():
    report = build_report(compose([]), _history(1.0, 1.0), duration_s=1.0,
                          global_evaluation="pooled")
    assert report["final"]["collapsed"] == {"global": True, "sites": ["hospital_01"]}
    md = render_markdown(report)
    assert "## Warnings" in md and "same class for every test example" in md


def test_report_names_collapsed_sites_and_stays_quiet_when_nothing_collapsed():
    report = build_report(compose([]), _history(0.0, 1.0), duration_s=1.0,
                          global_evaluation="pooled")
    assert report["final"]["collapsed"] == {"global": False, "sites": ["hospital_01"]}
    assert "hospital_01" in render_markdown(report).split("## Privacy")[0]
    quiet = build_report(compose([]), _history(0.0, 0.0), duration_s=1.0,
                         global_evaluation="pooled")
    assert quiet["final"]["collapsed"] == {"global": False, "sites": []}
    assert "## Warnings" not in render_markdown(quiet)
