"""Reports: the JSON contract, the human summary, plots and weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.evaluation import classification_metrics
from server.history import RunHistory
from server.report import build_report, client_mean, write_report
from server.settings import compose

SITE_METRICS = {"num-examples": 10.0, "loss": 0.5, "accuracy": 0.8, "balanced_accuracy": 0.7,
                "auroc": 0.9, "auprc": 0.85, "macro_f1": 0.75}


def _history() -> RunHistory:
    history = RunHistory(initial_global={"loss": 0.9, "accuracy": 0.5})
    for rnd in (1, 2):
        record = history.round(rnd)
        record.train = {"hospital_01": {"num-examples": 40.0, "train_loss": 0.6},
                        "hospital_02": {"num-examples": 20.0, "train_loss": 0.7}}
        record.sites = {"hospital_01": dict(SITE_METRICS),
                        "hospital_02": {**SITE_METRICS, "auroc": float("nan"), "accuracy": 0.6}}
        record.global_metrics = {"loss": 0.6 - 0.1 * rnd, "accuracy": 0.7, "auroc": 0.8}
    return history


def test_report_follows_the_contract():
    report = build_report(compose([]), _history(), duration_s=1.5, global_evaluation="pooled")
    assert set(report) >= {"run", "rounds", "final", "privacy"}
    run = report["run"]
    for key in ("task", "model", "strategy", "rounds", "num_hospitals", "seed", "privacy",
                "secure_aggregation", "duration_s", "versions"):
        assert key in run
    assert run["privacy"] == "off" and run["secure_aggregation"] is False
    assert set(run["versions"]) == {"flwr", "torch", "opacus"}
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    site = report["final"]["sites"]["hospital_01"]
    assert site["num_examples"] == 10 and site["accuracy"] == 0.8
    assert report["final"]["global"]["loss"] == pytest.approx(0.4)
    # undefined metrics are null, never NaN (invalid JSON) and never a made-up number
    assert report["final"]["sites"]["hospital_02"]["auroc"] is None
    json.dumps(report, allow_nan=False)
    assert report["privacy"] == {"hospital_01": {"dp": False}, "hospital_02": {"dp": False}}


def test_the_report_says_what_the_dp_guarantee_covers_and_what_it_does_not(tmp_path):
    history = _history()
    for record in history.rounds.values():  # DP sites send no training loss
        for metrics in record.train.values():
            metrics.pop("train_loss")
    reference = build_report(compose(["task=tabular", "privacy=dp"]), history, duration_s=1.0,
                             global_evaluation="pooled")
    guarantee = reference["privacy_guarantee"]
    assert guarantee["dp"] is True and guarantee["standardize"] == "reference"
    covered, leaks = " ".join(guarantee["covered"]), " ".join(guarantee["not_covered"])
    assert "model updates" in covered and "reference values" in covered
    assert "standardisation" not in leaks
    assert "evaluation metrics on its own test split" in leaks and "test examples" in leaks
    assert "training-set size" in covered or "number of training examples" in leaks
    write_report(tmp_path, reference, None)
    md = (tmp_path / "report.md").read_text()
    assert "(ε, δ)-DP per patient record at each site" in md
    assert "model updates the site sent" in md and "all updates" not in md
    assert "**What this guarantee covers**" in md and "reference values" in md
    assert "test split" in md

    site_stats = build_report(compose(["task=tabular", "privacy=dp", "task.standardize=site"]),
                              history, duration_s=1.0, global_evaluation="pooled")
    leaks = " ".join(site_stats["privacy_guarantee"]["not_covered"])
    assert "own training-split mean/sd" in leaks
    images = build_report(compose(["privacy=dp"]), history, duration_s=1.0,
                          global_evaluation="pooled")["privacy_guarantee"]
    assert images["standardize"] is None and "fixed by configuration" in " ".join(
        images["covered"])
    off = build_report(compose([]), history, duration_s=1.0, global_evaluation="pooled")
    assert off["privacy_guarantee"]["dp"] is False and not off["privacy_guarantee"]["covered"]


def test_client_mean_is_unweighted_and_skips_undefined():
    mean = client_mean({"a": {"accuracy": 0.8, "auroc": 0.9},
                        "b": {"accuracy": 0.6, "auroc": float("nan")}})
    assert mean["accuracy"] == pytest.approx(0.7)
    assert mean["auroc"] == pytest.approx(0.9)


def test_write_report_writes_all_outputs(tmp_path):
    report = build_report(compose([]), _history(), duration_s=1.0, global_evaluation="pooled")
    weights = {"w": torch.ones(2, 2)}
    write_report(tmp_path, report, weights)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    md = (tmp_path / "report.md").read_text()
    assert "No differential privacy" in md and "hospital_02" in md
    assert "ε" not in md and "epsilon" not in md.lower()  # a DP-off run never shows epsilon
    for name in ("global_metrics.png", "sites_accuracy.png", "sites_auroc.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = torch.load(tmp_path / "model.pt")
    assert torch.equal(saved["state_dict"]["w"], weights["w"])
    assert saved["model"]["name"] == "cnn" and saved["task"]["name"] == "images"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_binary_metrics_match_scikit_learn_definitions():
    labels = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(labels, probs, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(4 / 6)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["positive_rate"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(6), labels])))


def test_multiclass_auroc_is_macro_one_vs_rest_and_single_class_is_undefined():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    probs = rng.dirichlet(np.ones(3), size=9)
    m = classification_metrics(labels, probs, 3)
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    predicted = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert "positive_rate" not in m
    single = classification_metrics(np.zeros(4, dtype=int), probs[:4], 3)
    assert math.isnan(single["auroc"])
    assert single["accuracy"] == pytest.approx(np.mean(probs[:4].argmax(axis=1) == 0))
