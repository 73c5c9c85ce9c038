"""Baselines: what each hospital gets alone and what pooling all data gives, beside the
federated model, on the same test records, with the same privacy as the run."""

from __future__ import annotations

import pytest
from opacus.accountants import create_accountant

from client.tasks import get_task
from client.training import dp_schedule
from privacy.accounting import default_delta
from server.app import baselines_for_report
from server.history import RunHistory
from server.report import build_report, client_mean, render_markdown
from server.settings import ConfigError, baseline_kinds, compose
from simulations.baselines import compute_baselines
from simulations.sites import site_folders
from tests.in_process_grid import simulate_in_process

SMALL = ("task=tabular", "task.synthetic.train_size=60", "task.synthetic.test_size=20",
         "num_hospitals=3", "rounds=2")
SECTION = "## Federated vs each hospital alone vs pooled"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A real simulation with the default baselines; the global metrics pool 2 of 3 sites, so
    'the same test pool' means the same seeded sample, not simply every site."""
    out = tmp_path_factory.mktemp("baselines_on")
    return out, simulate_in_process(out, *SMALL, "simulation.pooled_eval_sites=2",
                                    "baselines=auto")


def test_a_simulation_reports_both_baselines_by_default(simulated):
    out, report = simulated
    baselines = report["baselines"]
    assert baselines["computed"] is True and baselines["kinds"] == ["local", "pooled"]
    assert baselines["epochs"] == 2 * report["run"]["config"]["local_epochs"]
    assert baselines["duration_s"] > 0
    sites = set(report["final"]["sites"])
    assert set(baselines["local"]["sites"]) == sites == set(baselines["pooled"]["sites"])
    for entry in (baselines["local"], baselines["pooled"]):
        assert entry["client_mean"]["auroc"] == pytest.approx(
            sum(m["auroc"] for m in entry["sites"].values()) / len(sites))
    # DP off: no epsilon anywhere, never epsilon = 0
    assert baselines["local"]["privacy"] == {"dp": False}
    assert baselines["pooled"]["privacy"] == {"dp": False}
    md = (out / "report.md").read_text()
    assert SECTION in md and "ε" not in md
    assert "it beats training alone at" in md and "the model trained on all data pooled" in md
    for site in sites:
        assert f"| {site} |" in md.split(SECTION)[1]


def test_baselines_are_scored_on_the_federation_s_own_test_splits(simulated):
    _, report = simulated
    final, baselines = report["final"], report["baselines"]
    for site, federated in final["sites"].items():
        assert baselines["local"]["sites"][site]["num_examples"] == federated["num_examples"]
        assert baselines["pooled"]["sites"][site]["num_examples"] == federated["num_examples"]
    pool = report["run"]["pooled_evaluation_sites"]
    assert len(pool) == 2
    assert baselines["pooled"]["global"]["num_examples"] == sum(
        final["sites"][site]["num_examples"] for site in pool)
    # the pooled model trained on every site's training split, not only the pool's
    assert baselines["pooled"]["num_train"] == sum(
        r["num_examples"] for r in report["sites"].values())


@pytest.mark.slow
def test_dp_baselines_report_their_own_accountant_epsilon(tmp_path, one_thread):
    cfg = compose([*SMALL, "num_hospitals=2", "privacy=dp", "privacy.target_epsilon=4"])
    folders = site_folders(cfg)
    out = compute_baselines(cfg, folders)
    ledgers = {**out["local"]["privacy"], "pooled": out["pooled"]["privacy"]}
    sizes = {site: len(get_task("tabular").load_site(folder, cfg["task"], site).train)
             for site, folder in folders.items()}
    sizes["pooled"] = out["pooled"]["num_train"]
    assert sizes["pooled"] == sum(sizes[s] for s in folders)
    for name, ledger in ledgers.items():
        assert ledger["dp"] is True and 0 < ledger["epsilon"] <= 4.0
        # sigma planned for the whole budget at this training set's own size and sample rate
        q, per_round = dp_schedule(sizes[name], cfg["batch_size"], cfg["local_epochs"])
        assert ledger["sample_rate"] == q and ledger["steps"] == 2 * per_round
        assert ledger["delta"] == default_delta(sizes[name])
        assert ledger["rounds_trained"] == 2 and len(ledger["epsilon_per_round"]) == 2
        # the reported epsilon is what an Opacus accountant gives for exactly those steps,
        # after the size release every DP ledger charges first (σ = count_noise, q = 1)
        accountant = create_accountant(mechanism=ledger["accountant"])
        accountant.history = [(ledger["count_noise"], 1.0, 1),
                              (ledger["noise_multiplier"], q, ledger["steps"])]
        assert ledger["epsilon"] == pytest.approx(accountant.get_epsilon(ledger["delta"]))
    # the pooled set samples at another rate, so it needs other noise for the same target
    assert ledgers["pooled"]["noise_multiplier"] != ledgers["hospital_01"]["noise_multiplier"]


def test_a_dp_baseline_stops_at_the_sites_budget_as_the_site_would(one_thread):
    """A fixed sigma with a budget: the round that would pass max_epsilon is declined."""
    cfg = compose([*SMALL, "num_hospitals=1", "rounds=4", "privacy=dp",
                   "privacy.target_epsilon=null", "privacy.noise_multiplier=2.0",
                   "privacy.max_epsilon=3.5", "batch_size=32", "local_epochs=3"])
    ledger = compute_baselines(cfg, site_folders(cfg), ("local",))["local"]["privacy"][
        "hospital_01"]
    assert 0 < ledger["rounds_trained"] < 4
    assert ledger["rounds_trained"] + ledger["rounds_declined"] == 4
    assert 0 < ledger["epsilon"] <= 3.5 and ledger["noise_multiplier"] == 2.0


def test_the_same_seed_and_config_give_identical_baselines(one_thread):
    cfg = compose(list(SMALL))
    folders = site_folders(cfg)
    first, second = compute_baselines(cfg, folders), compute_baselines(cfg, folders)
    first.pop("duration_s"), second.pop("duration_s")
    assert first == second
    other = compute_baselines(compose([*SMALL, "seed=1"]), folders)
    assert other["local"]["sites"] != first["local"]["sites"]


def test_training_alone_is_a_federation_of_one(tmp_path):
    """One hospital, one round: the federated model is that hospital's own update, so the
    model trained alone must score the same (same initial weights, settings and seed)."""
    report = simulate_in_process(tmp_path, *SMALL, "num_hospitals=1", "rounds=1",
                                 "baselines=[local]")
    assert report["baselines"]["kinds"] == ["local"] and "pooled" not in report["baselines"]
    federated = report["final"]["sites"]["hospital_01"]
    alone = report["baselines"]["local"]["sites"]["hospital_01"]
    assert set(alone) == set(federated)
    for name, value in federated.items():
        assert alone[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("value", ["[local,local]", "[central]", "yes", "false", "3"])
def test_a_bad_baselines_value_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^baselines must be 'auto', a list of some of "
                                          r"\['local', 'pooled'\]"):
        compose([f"baselines={value}"])


@pytest.mark.parametrize(("overrides", "kinds"), [
    ([], ("local", "pooled")),
    (["num_hospitals=20"], ("local", "pooled")),
    (["num_hospitals=21"], ()),  # auto: off above 20 sites
    (["num_hospitals=100", "baselines=[pooled]"], ("pooled",)),  # asked for explicitly
    (["baselines=[]"], ()),
    (["baselines=none"], ()),
    (["baselines=null"], ()),
])
def test_baselines_setting(overrides, kinds):
    assert baseline_kinds(compose(overrides)) == kinds


def _report_with_baselines(sites: dict[str, tuple[float, float, float]]) -> dict:
    """A report whose sites have (federated, alone, pooled) AUROC; the global pool holds all."""
    cfg = compose([])
    history = RunHistory()
    record = history.round(1)
    record.sites = {s: {"num-examples": 10.0, "auroc": v[0], "balanced_accuracy": 0.7}
                    for s, v in sites.items()}
    record.train = {s: {"num-examples": 30.0} for s in sites}
    record.global_metrics = {"auroc": 0.90, "balanced_accuracy": 0.70}
    baselines = {
        "computed": True, "kinds": ["local", "pooled"], "epochs": 15, "duration_s": 2.0,
        "local": {"sites": {s: {"num_examples": 10, "auroc": v[1], "balanced_accuracy": 0.6}
                            for s, v in sites.items()},
                  "privacy": {"dp": False}},
        "pooled": {"global": {"num_examples": 10 * len(sites), "auroc": 0.95,
                              "balanced_accuracy": 0.8},
                   "sites": {s: {"num_examples": 10, "auroc": v[2], "balanced_accuracy": 0.8}
                             for s, v in sites.items()},
                   "num_train": 30 * len(sites), "privacy": {"dp": False}},
    }
    for entry in (baselines["local"], baselines["pooled"]):
        entry["client_mean"] = client_mean(entry["sites"])
    return build_report(cfg, history, duration_s=1.0, global_evaluation="pooled",
                        baselines=baselines)


def test_report_md_states_the_gaps_in_plain_words():
    report = _report_with_baselines({"a": (0.90, 0.80, 0.95), "b": (0.80, 0.85, 0.90),
                                     "c": (0.70, float("nan"), 0.80)})
    md = render_markdown(report)
    section = md.split(SECTION)[1].split("## Rounds")[0]
    assert ("on the pooled test set the federated model (0.900) is 0.050 below the model "
            "trained on all data pooled (0.950)") in section
    # client means: federated (0.9+0.8+0.7)/3 = 0.800; alone (0.80+0.85)/2 = 0.825 (c undefined)
    assert ("it averages 0.800, 0.025 below the hospitals' own models trained alone (0.825); "
            "it beats training alone at 1 of 2 hospitals (1 have it undefined)") in section
    assert "| c | 10 | 0.700 | n/a | 0.800 |" in section  # undefined stays n/a, never 0
    assert "| **global** | 30 | 0.900 | 0.825† | 0.950 |" in section


def test_above_20_sites_the_comparison_is_summarized():
    report = _report_with_baselines({f"h{i:02d}": (0.8, 0.7, 0.9) for i in range(25)})
    section = render_markdown(report).split(SECTION)[1].split("## Rounds")[0]
    assert "| h00 |" not in section
    assert "| AUROC: federated − alone | 25 | 0.100 |" in section
    assert "| AUROC: federated − pooled | 25 | -0.100 |" in section
    assert "beats training alone at 25 of 25 hospitals" in section


def test_deployment_says_baselines_were_not_computed():
    cfg = compose([])
    entry = baselines_for_report(None, cfg, deployed=True)
    assert entry["computed"] is False and "deployment" in entry["reason"]
    report = build_report(cfg, RunHistory(), duration_s=1.0,
                          global_evaluation="site_weighted_mean", baselines=entry)
    assert "Baselines were not computed: deployment" in render_markdown(report)
    # a simulation caller that passes no baselines, or a run that turns them off: nothing
    assert baselines_for_report(None, cfg, deployed=False) is None
    assert baselines_for_report(None, compose(["baselines=none"]), deployed=True) is None


def test_a_failing_baseline_does_not_cost_the_run_its_report():
    def broken(cfg):
        raise RuntimeError("out of memory")

    entry = baselines_for_report(broken, compose([]), deployed=False)
    assert entry == {"computed": False, "reason": "failed: RuntimeError: out of memory"}
