"""tracking=mlflow: a finished run, read back from a real local MLflow store with MLflow's own
client, holds the run's config, every round's global and per-site metrics, each site's ε per
round and the report, plots and model; a sweep is one MLflow run per job in one experiment.
The runs are real (tiny, sites in this process: tests/in_process_grid.py)."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest

# the tracking extra is part of '.[dev]' (CI): without it this module fails, never skips
from mlflow.tracking import MlflowClient

from server.settings import CONF_DIR, ConfigError, compose
from simulations import tracking
from tests.helpers import ROOT
from tests.in_process_grid import run_in_process, simulate_in_process

TINY = ("task=tabular", "num_hospitals=2", "rounds=2", "task.synthetic.train_size=60",
        "task.synthetic.test_size=30", "local_epochs=1", "device=cpu")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A DP run logged as simulations/run.py logs it when it ends (log_run(cfg, out_dir))."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    store = root / "store" / "mlflow.db"
    cfg = compose([*TINY, "privacy=dp", "tracking=mlflow", f"tracking.uri={store}"])
    report = simulate_in_process(out, *TINY, "privacy=dp", "tracking=mlflow",
                                 f"tracking.uri={store}")
    run_id = tracking.log_run(cfg, out)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    return client, run_id, report, out, cfg


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_every_rounds_global_and_per_site_metrics_are_a_metric_history(logged):
    client, run_id, report, _, _ = logged
    rounds = report["rounds"]
    assert _history(client, run_id, "global/accuracy") == (
        [(0, report["initial"]["global"]["accuracy"])]
        + [(r["round"], r["global"]["accuracy"]) for r in rounds])
    assert [s for s, _ in _history(client, run_id, "global/loss")] == [0, 1, 2]
    for site in ("hospital_01", "hospital_02"):
        assert _history(client, run_id, f"site/{site}/auroc") == [
            (r["round"], r["sites"][site]["auroc"]) for r in rounds], site
    final = client.get_run(run_id).data.metrics
    assert final["final/auroc"] == report["final"]["global"]["auroc"]
    assert final["final_client_mean/accuracy"] == report["final"]["client_mean"]["accuracy"]


def test_each_sites_epsilon_is_logged_per_round_as_its_ledger_says(logged):
    client, run_id, report, _, _ = logged
    for site, led in report["privacy"].items():
        assert led["dp"] and len(led["epsilon_per_round"]) == 2
        assert _history(client, run_id, f"epsilon/{site}") == [
            (1, led["epsilon_per_round"][0]), (2, led["epsilon_per_round"][1])], site
        assert client.get_run(run_id).data.metrics[f"final_epsilon/{site}"] == led["epsilon"]
    assert _history(client, run_id, "epsilon/max") == [
        (n, max(led["epsilon_per_round"][n - 1] for led in report["privacy"].values()))
        for n in (1, 2)]


def test_the_resolved_config_is_the_runs_params_without_where_it_was_logged(logged):
    client, run_id, report, _, _ = logged
    params = client.get_run(run_id).data.params
    assert params["privacy.name"] == "dp"
    assert params["task.name"] == "tabular"
    assert params["rounds"] == "2" and params["num_hospitals"] == "2"
    assert params["privacy.accountant"] == str(report["run"]["config"]["privacy"]["accountant"])
    assert not [k for k in params if k.startswith("tracking")]


def test_report_plots_and_model_are_artifacts_and_site_secrets_are_not(logged, tmp_path):
    client, run_id, _, out, _ = logged
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "report.md", "sites.csv", "model.pt", "plots"} <= top
    assert not {"sites", "checkpoint.npz"} & top  # ledgers and keys stay in the run folder
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/global_metrics.png", "plots/privacy_epsilon.png"} <= plots
    copy = client.download_artifacts(run_id, "report.json", str(tmp_path))
    assert open(copy, "rb").read() == (out / "report.json").read_bytes()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.note.content"] == (out / "report.md").read_text()


def test_the_experiment_is_named_after_the_task_and_a_report_is_logged_once(logged):
    client, run_id, _, out, cfg = logged
    experiment = client.get_experiment_by_name("medsilo-tabular")
    assert experiment is not None and client.get_run(run_id).info.experiment_id == (
        experiment.experiment_id)
    assert tracking.log_run(cfg, out) == run_id  # the CLI over the same folder: no duplicate
    assert len(client.search_runs([experiment.experiment_id])) == 1


@pytest.mark.slow
def test_a_multirun_sweep_is_one_mlflow_run_per_job_in_one_experiment(tmp_path, monkeypatch):
    """``python -m simulations.run -m lr=... tracking=mlflow`` (Hydra's own multirun, sites in
    this process): each job logs itself as it ends; ``python -m simulations.tracking SWEEP_DIR``
    afterwards adds nothing (each report is logged once)."""
    import simulations.run as job

    sweep, store = tmp_path / "sweep", tmp_path / "mlflow.db"
    monkeypatch.setattr(job, "run_in_process", run_in_process)
    monkeypatch.setattr(sys, "argv", ["simulations.run", "-m", *TINY, "rounds=1",
                                      "baselines=none", "lr=0.01,0.1", "tracking=mlflow",
                                      f"tracking.uri={store}", "tracking.experiment=sweep",
                                      f"hydra.sweep.dir={sweep}"])
    # simulations.run's own main under Hydra, its config found by path (Hydra looks for a
    # `conf` package when the job is not __main__)
    hydra.main(config_path=str(CONF_DIR), config_name="config",
               version_base="1.3")(job.main.__wrapped__)()
    assert len(list(sweep.rglob("report.json"))) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")

    def logged():
        return client.search_runs([client.get_experiment_by_name("sweep").experiment_id])

    runs = logged()  # logged by the jobs themselves
    assert sorted(r.data.params["lr"] for r in runs) == ["0.01", "0.1"]
    assert {r.data.tags["medsilo.sweep_dir"] for r in runs} == {str(sweep)}
    assert sorted(r.data.tags["medsilo.job_num"] for r in runs) == ["0", "1"]
    for run in runs:  # named by what the sweep varied
        assert run.info.run_name == f"lr={run.data.params['lr']}"
    assert tracking.main([str(sweep), "--uri", str(store), "--experiment", "sweep"]) == 0
    assert len(logged()) == 2


def test_epsilon_rounds_come_from_the_rounds_each_site_trained():
    """A site that declined round 2 spent nothing then: its second ε belongs to round 3. A site
    whose entries do not match its trained rounds gets no per-round series (never a shifted
    one), only its final ε."""
    report = {"rounds": [{"round": 1, "train": {"a": {}, "b": {}}},
                         {"round": 2, "train": {"b": {}}},
                         {"round": 3, "train": {"a": {}, "b": {}}}],
              "privacy": {"a": {"dp": True, "epsilon": 2.0, "epsilon_per_round": [1.0, 2.0]},
                          "b": {"dp": True, "epsilon": 9.0, "epsilon_per_round": [1, 2]}}}
    assert tracking.epsilon_by_round(report) == {1: {"a": 1.0}, 3: {"a": 2.0}}
    assert tracking.summary_metrics(report)["final_epsilon/b"] == 9.0
    report["rounds"][1]["privacy"] = {"b": {"epsilon": 1.5}}  # a report with per-round ledgers
    assert tracking.epsilon_by_round(report) == {2: {"b": 1.5}}


def test_site_names_become_metric_names_mlflow_accepts():
    assert tracking.metric_key("site", "St. Mary's (north)", "auroc") == (
        "site/St. Mary_s _north_/auroc")


def test_a_plain_path_is_a_sqlite_store_and_a_uri_is_kept(tmp_path):
    assert tracking.tracking_uri("db/m.db", base=tmp_path) == f"sqlite:///{tmp_path}/db/m.db"
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(("change", "named"), [
    ({"name": "wandb"}, "tracking must be 'off' or 'mlflow', got 'wandb'"),
    ({"experiment": ""}, "tracking.experiment must be a non-empty string, got ''"),
    ({"uri": None}, "tracking.uri must be a non-empty string, got None"),
])
def test_a_bad_tracking_setting_is_refused_naming_the_key(change, named):
    cfg = compose(["tracking=mlflow"])
    cfg["tracking"].update(change)
    with pytest.raises(ConfigError, match="^" + named.replace("(", r"\(").replace(")", r"\)")):
        tracking.check(cfg)


def test_without_the_extra_tracking_says_how_to_install_it(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tracking\]'"):
        tracking.check(compose(["tracking=mlflow"]))
    tracking.check(compose([]))  # tracking=off needs nothing


def test_the_cli_names_a_folder_that_holds_no_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tracking.main([str(tmp_path / "empty"), "--uri", str(tmp_path / "m.db")]) == 2
    assert f"{tmp_path / 'empty'} holds no report.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    assert tracking.main([str(bad), "--uri", str(tmp_path / "m.db")]) == 2
    assert f"{bad / 'report.json'} is not valid JSON" in capsys.readouterr().err


def test_checking_the_tracking_config_loads_no_mlflow():
    """tracking=mlflow is checked before a run starts, in the process that answers --help."""
    code = ("import sys\nfrom server.settings import compose\nfrom simulations import tracking\n"
            "tracking.check(compose(['tracking=mlflow']))\nprint('mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
