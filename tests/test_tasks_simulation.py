"""Every clinical task runs end to end on its synthetic hospitals and beats chance."""

from __future__ import annotations

import pytest

from tests.helpers import run_simulation_cli


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "sizes"),
    [
        ("vitals", ("task.synthetic.train_size=200", "task.synthetic.test_size=100")),
        ("notes", ("task.synthetic.train_size=250", "task.synthetic.test_size=100")),
        ("tabular", ()),
    ],
)
def test_two_rounds_three_hospitals_beat_chance(tmp_path, task, sizes):
    report = run_simulation_cli(tmp_path, f"task={task}", "rounds=2", "num_hospitals=3", *sizes)
    assert report["run"]["task"] == task
    assert len(report["final"]["sites"]) == 3
    final, initial = report["final"]["global"], report["initial"]["global"]
    assert final["auroc"] > 0.65, final
    assert final["auroc"] > initial["auroc"], (initial, final)
