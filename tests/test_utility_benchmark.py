"""The privacy-utility benchmark judges its cells by the issue's targets, not by eye."""

from __future__ import annotations

from simulations.benchmarks.utility import check_targets, markdown_table


def _cell(epsilon, federated, *, collapsed=False, fed_mean=0.8, local_mean=0.7):
    return {"task": "images", "epsilon_target": epsilon, "metric": "auroc",
            "federated": federated, "federated_balanced_accuracy": 0.7,
            "federated_client_mean": fed_mean, "collapsed": collapsed, "collapsed_sites": [],
            "local_client_mean": local_mean, "pooled": 0.95, "epsilon_spent_max": epsilon,
            "wall_s": 1.0, "run_dir": "x"}


def test_targets_are_checked_against_the_non_private_run_of_the_same_task():
    cells = check_targets([_cell(None, 0.90), _cell(8.0, 0.86), _cell(1.0, 0.70)])
    plain, eps8, eps1 = (c["targets"] for c in cells)
    assert eps8["within_0.05_of_no_dp"] is True  # 0.86 >= 0.90 - 0.05
    assert "within_0.05_of_no_dp" not in eps1 and "within_0.05_of_no_dp" not in plain
    assert all(t["no_collapse"] and t["federated_at_least_local"] for t in (plain, eps8, eps1))


def test_a_missed_target_is_named_in_the_table():
    cells = check_targets([_cell(None, 0.90), _cell(8.0, 0.80, collapsed=True,
                                                    fed_mean=0.6, local_mean=0.7)])
    eps8 = cells[1]["targets"]
    assert eps8 == {"no_collapse": False, "federated_at_least_local": False,
                    "within_0.05_of_no_dp": False}
    row = markdown_table(cells, {}).splitlines()[3]
    assert "MISSED: no_collapse, federated_at_least_local, within_0.05_of_no_dp" in row
