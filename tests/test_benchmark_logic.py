"""The benchmarks' own logic on tiny inputs (their full runs are the benchmarks themselves):
what they measure is exact, and what they conclude follows from the numbers."""

from __future__ import annotations

import sys

import pytest

from privacy.secagg import benchmark as secagg_benchmark
from simulations.benchmarks import many_sites, training


def test_the_secagg_benchmark_checks_the_exact_sum_and_prints_every_stage(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark", "--sites", "4", "--length", "64"])
    secagg_benchmark.main()
    out = capsys.readouterr().out
    assert "exact sum OK" in out and "n=4" in out
    assert all(stage in out for stage in ("advertise-keys", "consistency", "unmask"))
    split, combine = secagg_benchmark.time_shamir(num_holders=5, repeats=1)
    assert split > 0 and combine > 0


def test_the_training_benchmark_times_plain_and_dp_epochs_of_the_same_model():
    row = training.epoch_times("tabular", repeats=1)
    assert row["task"] == "tabular" and row["train_examples"] > 0
    assert row["dp_ratio"] == pytest.approx(row["dp_epoch_s"] / row["epoch_s"], rel=0.02)
    assert len(row["dp_ratios_per_repeat"]) == 1


def test_the_many_sites_median_round_leaves_out_start_up_and_the_final_evaluation():
    assert many_sites._median_round([9.0, 1.0, 2.0, 3.0, 7.0]) == (2.0, "rounds 2..4")
    assert many_sites._median_round([9.0, 7.0])[0] == 9.0
    assert many_sites._median_round([]) == (None, "none")


def _row(n, status="ok", rss=100.0, ratio=1.0):
    return {"num_hospitals": n, "status": status, "peak_rss_tree_mb": rss, "ratio": ratio,
            "sites_per_round": 10, "trained_per_round": [10, 10, 10],
            "median_covers": "rounds 2..2"}


def test_the_many_sites_verdict_passes_and_fails_on_the_numbers():
    good = many_sites.verdict([_row(10), _row(1000, ratio=1.2)])
    assert good[0].startswith("RSS: PASS") and good[1].startswith("ratio: PASS")
    bad = many_sites.verdict([_row(10), _row(1000, rss=10 * many_sites.RSS_TARGET_MB,
                                                ratio=many_sites.RATIO_TARGET + 1)])
    assert bad[0].startswith("RSS: FAIL") and bad[1].startswith("ratio: FAIL")
    crashed = many_sites.verdict([_row(10), _row(1000, status="timeout")])
    assert crashed[0] == "RSS: FAIL: the largest run (N=1000) timeout"


def test_the_many_sites_command_line_keeps_its_own_keys_out_of_the_overrides():
    flags, overrides = many_sites._split_overrides(["--sites", "10", "privacy=dp",
                                                    "--task", "tabular"])
    assert overrides == ["privacy=dp"] and "--task" in flags
    key = next(iter(many_sites.OWN_KEYS))
    with pytest.raises(SystemExit, match=f"{key} is set by this benchmark"):
        many_sites._split_overrides([f"{key}=3"])
