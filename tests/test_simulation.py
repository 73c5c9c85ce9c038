"""End to end: the main job as a user runs it, on tiny synthetic hospitals."""

from __future__ import annotations

import pytest

from tests.helpers import run_simulation_cli

TINY = ("rounds=2", "num_hospitals=3", "task.synthetic.train_size=200",
        "task.synthetic.test_size=100")
METRICS = ("loss", "accuracy", "balanced_accuracy", "auroc", "auprc", "macro_f1")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    return out, run_simulation_cli(out, *TINY)


@pytest.mark.slow
def test_simulation_writes_the_report_contract(first_run):
    out, report = first_run
    for name in ("report.json", "report.md", "model.pt", "plots/global_metrics.png"):
        assert (out / name).is_file(), name
    run = report["run"]
    assert (run["task"], run["model"], run["strategy"]) == ("images", "cnn", "fedavg")
    assert run["rounds"] == 2 and run["num_hospitals"] == 3 and run["privacy"] == "off"
    assert run["secure_aggregation"] is False and run["duration_s"] > 0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    # baselines=none (tests/helpers.py): absent from both reports, never half there
    assert report["baselines"] is None
    assert "each hospital alone" not in (out / "report.md").read_text()
    sites = {"hospital_01", "hospital_02", "hospital_03"}
    for rnd in report["rounds"]:
        assert set(rnd["sites"]) == sites and not rnd["failures"]
        assert set(rnd["global"]) >= set(METRICS)
    for site in report["final"]["sites"].values():
        assert site["num_examples"] > 0 and set(site) >= set(METRICS)
    assert set(report["final"]["client_mean"]) == set(METRICS)
    assert report["privacy"] == {s: {"dp": False} for s in sites}
    md = (out / "report.md").read_text()
    assert "No differential privacy" in md and "ε" not in md


@pytest.mark.slow
def test_the_pooled_global_evaluation_is_the_sites_evaluations_of_the_same_model(first_run):
    """Each round the server evaluates the global model on the union of the sites' test splits
    and every site evaluates the model it received on its own: the same model on the same
    records, so the decomposable metrics agree exactly with the example-weighted site means."""
    _, report = first_run
    assert report["run"]["global_evaluation"] == "pooled"
    for rnd in report["rounds"]:
        sites = rnd["sites"].values()
        n = sum(site["num_examples"] for site in sites)
        for metric in ("accuracy", "positive_rate"):
            weighted = sum(site[metric] * site["num_examples"] for site in sites) / n
            assert rnd["global"][metric] == pytest.approx(weighted, rel=1e-9), (rnd["round"],
                                                                                 metric)


@pytest.mark.slow
def test_federated_training_learns(first_run):
    _, report = first_run
    initial, final = report["initial"]["global"], report["final"]["global"]
    assert final["loss"] < initial["loss"]
    labels_seen = [site["positive_rate"] * site["num_examples"]
                   for site in report["final"]["sites"].values()]
    n = sum(site["num_examples"] for site in report["final"]["sites"].values())
    majority = max(sum(labels_seen), n - sum(labels_seen)) / n
    assert final["accuracy"] > majority, (final, majority)


@pytest.mark.slow
def test_same_seed_same_config_gives_identical_metrics(first_run, tmp_path):
    _, report = first_run
    again = run_simulation_cli(tmp_path, *TINY)
    assert again["final"] == report["final"]
    assert [r["sites"] for r in again["rounds"]] == [r["sites"] for r in report["rounds"]]
