"""DP-SGD end to end: the ledger each site reports is exactly what an accountant gives for
the steps it ran, budgets are enforced at the site, and DP training still learns. The sites run
in this process (tests/in_process_grid.py): the accounting, not the engine, is the point."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import TensorDataset

from client.privacy_budget import count_noise_draw
from client.tasks import get_task
from client.training import DPConfig, LocalTrainingConfig, dp_schedule, site_seed, train_local
from server.settings import compose
from simulations.sites import site_folders
from tests.in_process_grid import simulate_in_process

BASE = ("num_hospitals=3", "task.synthetic.train_size=200", "task.synthetic.test_size=100",
        "privacy=dp", "local_epochs=2")


def _independent_epsilon(accountant: str, sigma: float, q: float, steps: int, delta: float,
                         count_noise: float | None = None):
    """ε from a fresh Opacus accountant: the site's noisy count release (σ = count_noise,
    q = 1, one step) first, when it released one, then its DP-SGD steps."""
    acct = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    acct.history = [(count_noise, 1.0, 1)] * (count_noise is not None) + [(sigma, q, steps)]
    return acct.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_target")
    report = simulate_in_process(out, *BASE, "rounds=3", "privacy.target_epsilon=8",
                                 "privacy.accountant=prv")
    return out, report


def test_ledger_matches_an_independent_accountant(target_run):
    _, report = target_run
    assert report["run"]["privacy"] == "dp"
    assert set(report["privacy"]) == {"hospital_01", "hospital_02", "hospital_03"}
    for site, led in report["privacy"].items():
        assert led["dp"] is True and led["accountant"] == "prv"
        assert led["rounds_trained"] == 3 and led["rounds_declined"] == 0
        assert len(led["epsilon_per_round"]) == 3
        assert led["epsilon_per_round"] == sorted(led["epsilon_per_round"])
        assert led["count_noise"] == 10.0  # conf/privacy/dp.yaml
        expected = _independent_epsilon("prv", led["noise_multiplier"], led["sample_rate"],
                                        led["steps"], led["delta"], led["count_noise"])
        assert led["epsilon"] == pytest.approx(expected, abs=1e-6), site
        assert led["epsilon_per_round"][-1] == pytest.approx(led["epsilon"], abs=1e-9)
        # δ below 1/n for the site's training records
        n_train = report["rounds"][-1]["train"][site]["num_examples"]
        assert led["delta"] < 1 / n_train
    # no un-noised statistic of the training data comes back with a DP update
    for record in report["rounds"]:
        for site, metrics in record["train"].items():
            assert "train_loss" not in metrics, (record["round"], site)


def test_target_epsilon_is_reached_but_not_exceeded(target_run):
    _, report = target_run
    for led in report["privacy"].values():
        assert 0.9 * 8 <= led["epsilon"] <= 8, led


def test_dp_training_still_learns(target_run):
    _, report = target_run
    # beats chance (AUROC 0.5) clearly at epsilon = 8 with ~200 records per site
    assert report["final"]["global"]["auroc"] > 0.65
    assert report["final"]["global"]["auroc"] > report["initial"]["global"]["auroc"] + 0.1


def test_privacy_section_in_markdown_and_plot(target_run):
    out, _ = target_run
    md = (out / "report.md").read_text()
    assert "(ε, δ)-DP per patient record at each site" in md
    guarantee = json.loads((out / "report.json").read_text())["privacy_guarantee"]
    assert guarantee["dp"] is True and guarantee["covered"] and guarantee["not_covered"]
    assert "**What this guarantee covers**" in md
    assert all(item in md for item in guarantee["covered"] + guarantee["not_covered"])
    assert (out / "plots" / "privacy_epsilon.png").is_file()
    assert (out / "sites" / "hospital_01" / "privacy_ledger.json").is_file()


def test_only_training_without_dp_reports_its_loss():
    data = TensorDataset(torch.randn(40, 5), torch.randint(0, 2, (40,)))
    config = LocalTrainingConfig(batch_size=10, lr=0.1)
    plain = train_local(torch.nn.Linear(5, 2), data, config, seed=0)
    private = train_local(torch.nn.Linear(5, 2), data, config, seed=0,
                          dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert set(plain) == {"train_loss", "steps"}
    assert set(private) == {"steps"}  # the un-noised mean loss would leak; it stays home


def test_a_site_over_budget_declines_and_the_run_finishes(tmp_path):
    sigma, rounds, epochs = 1.0, 3, 2
    overrides = (*BASE[:3], "privacy=dp", f"local_epochs={epochs}", f"rounds={rounds}",
                 "privacy.target_epsilon=null", f"privacy.noise_multiplier={sigma}",
                 "privacy.accountant=rdp", "privacy.delta=1e-5", "batch_size=32")
    cfg = compose(list(overrides))
    task = get_task("images")
    sizes = {site: len(task.load_site(folder, cfg["task"], site).train)
             for site, folder in site_folders(cfg).items()}
    trajectories = {}
    for site, n in sizes.items():
        # q follows the site's released noisy count ñ, drawn at its first round (round 1)
        draw = count_noise_draw(site_seed(int(cfg["seed"]), site, 1), secure=False)
        released = max(1, round(n + cfg["privacy"]["count_noise"] * draw))
        q, steps = dp_schedule(released, 32, epochs)
        trajectories[site] = [_independent_epsilon("rdp", sigma, q, k * steps, 1e-5,
                                                   cfg["privacy"]["count_noise"])
                              for k in range(1, rounds + 1)]
    # the budget lets the most exposed site train 2 rounds; others may train all 3
    worst = max(trajectories, key=lambda s: trajectories[s][-1])
    budget = (trajectories[worst][1] + trajectories[worst][2]) / 2
    expected_trained = {s: sum(e <= budget for e in t) for s, t in trajectories.items()}
    assert expected_trained[worst] == 2 and max(expected_trained.values()) == 3

    report = simulate_in_process(tmp_path, *overrides, f"privacy.max_epsilon={budget}")
    assert report["run"]["stopped_early"] is None
    for site, led in report["privacy"].items():
        assert led["rounds_trained"] == expected_trained[site], site
        assert led["rounds_declined"] == rounds - expected_trained[site], site
        assert led["epsilon"] <= budget
    declined_round = report["rounds"][2]["declined"]
    assert worst in declined_round and "above this site's budget" in declined_round[worst]
    assert worst not in report["rounds"][2]["train"]  # left out of aggregation
    md = (tmp_path / "report.md").read_text()
    assert f"declined: {worst}" in md
