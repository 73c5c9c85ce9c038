"""simulations/compare.py: the runs of a sweep side by side (issue 19)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from simulations.compare import CompareError, compare, main
from tests.in_process_grid import simulate_in_process

SMALL = ("task=tabular", "num_hospitals=2", "rounds=1", "task.synthetic.train_size=60",
         "task.synthetic.test_size=30", "local_epochs=1", "device=cpu")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A multirun-like folder: two DP runs at different ε and one without DP."""
    root = tmp_path_factory.mktemp("multirun")
    for name, extra in (("privacy=dp,privacy.target_epsilon=1", ("privacy=dp",
                                                                 "privacy.target_epsilon=1")),
                        ("privacy=dp,privacy.target_epsilon=8", ("privacy=dp",
                                                                 "privacy.target_epsilon=8")),
                        ("privacy=off", ())):
        simulate_in_process(root / name, *SMALL, *extra)
    return root


def test_a_sweep_folder_gives_one_row_per_run_with_what_differs_and_the_privacy_spent(sweep):
    result = compare([sweep])
    header, rows = result["header"], result["rows"]
    assert result["runs"] == 3 and len(rows) == 3
    # only what differs between the runs, not the whole config
    assert "privacy.name" in header and "privacy.target_epsilon" in header
    assert "task.name" not in header and "seed" not in header and "rounds" not in header
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    reports = {name: json.loads((sweep / name / "report.json").read_text()) for name in by_run}
    for name, row in by_run.items():
        report = reports[name]
        assert float(row["auroc"]) == pytest.approx(report["final"]["global"]["auroc"], 1e-3)
        if report["run"]["privacy"] == "off":
            assert row["epsilon (max over hospitals)"] == "no DP"  # never "0"
        else:
            worst = max(led["epsilon"] for led in report["privacy"].values())
            assert float(row["epsilon (max over hospitals)"]) == pytest.approx(worst, 1e-3)
            assert worst <= float(row["privacy.target_epsilon"])
    low, high = (float(by_run[f"privacy=dp,privacy.target_epsilon={e}"]
                       ["epsilon (max over hospitals)"]) for e in (1, 8))
    assert low < high
    with (sweep / "comparison.csv").open() as handle:
        assert list(csv.reader(handle)) == [header, *rows]
    assert (sweep / "comparison.md").read_text().count("\n| ") == 4  # header + 3 runs
    assert (sweep / "privacy_utility.png").stat().st_size > 10_000


def test_runs_that_do_not_differ_in_epsilon_get_no_plot_and_bad_input_is_named(sweep, tmp_path,
                                                                               capsys):
    alone = tmp_path / "alone"
    shutil.copytree(sweep / "privacy=off", alone / "a")
    shutil.copytree(sweep / "privacy=off", alone / "b")
    result = compare([alone])
    assert [p.name for p in result["written"]] == ["comparison.md", "comparison.csv"]
    assert result["header"][0] == "run" and "privacy.name" not in result["header"]
    with pytest.raises(CompareError, match="holds no report.json"):
        compare([tmp_path / "alone" / "a" / "plots"])
    assert main([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (alone / "a" / "report.json").write_text("{")
    with pytest.raises(CompareError, match="not a medsilo report"):
        compare([alone])


def test_the_python_api_composes_the_same_config_and_returns_the_report(tmp_path, monkeypatch):
    """``from simulations import simulate`` (issue 19): overrides in, report.json out."""
    import simulations.run as job
    from server.settings import ConfigError
    from simulations import simulate
    from tests.in_process_grid import run_in_process

    monkeypatch.setattr(job, "run_in_process", run_in_process)  # the sites in this process
    report = simulate([*SMALL, "baselines=none"], out_dir=tmp_path / "run")
    assert report == json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["num_hospitals"] == 2 and len(report["rounds"]) == 1
    assert report["run"]["config"]["task"]["synthetic"]["train_size"] == 60
    with pytest.raises(ConfigError, match="rounds"):
        simulate(["rounds=0"], out_dir=tmp_path / "bad")
    with pytest.raises(TypeError, match="list of strings"):
        simulate("task=tabular")
