"""Every clinical task runs end to end on its synthetic hospitals and beats chance: the main
job's ``simulate`` with the real ServerApp and ClientApp, the sites in this process
(tests/in_process_grid.py; the Ray engine itself is tested by tests/test_simulation.py)."""

from __future__ import annotations

import pytest

import simulations.run as job
from server.settings import compose
from tests.in_process_grid import run_in_process


@pytest.mark.parametrize(
    ("task", "sizes"),
    [
        ("vitals", ("task.synthetic.train_size=200", "task.synthetic.test_size=100")),
        ("notes", ("task.synthetic.train_size=250", "task.synthetic.test_size=100")),
        ("tabular", ()),
    ],
)
def test_two_rounds_three_hospitals_beat_chance(tmp_path, monkeypatch, task, sizes):
    monkeypatch.setattr(job, "run_in_process", run_in_process)
    report = job.simulate(compose([f"task={task}", "rounds=2", "num_hospitals=3",
                                   "baselines=none", *sizes]), tmp_path)
    assert report["run"]["task"] == task
    assert len(report["final"]["sites"]) == 3
    final, initial = report["final"]["global"], report["initial"]["global"]
    assert final["auroc"] > 0.65, final
    assert final["auroc"] > initial["auroc"], (initial, final)
