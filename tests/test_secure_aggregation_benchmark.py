"""simulations/benchmarks/secure_aggregation.py: the by-stage profile of a secure round, read
from report.json, on tiny rows (the benchmark's runs themselves take minutes)."""

from __future__ import annotations

import pytest

from simulations.benchmarks import secure_aggregation as bench


def _round(duration: float, **stages: float) -> dict:
    return {"duration_s": duration, "secure_aggregation": {"stage_s": stages} if stages else None}


def test_the_stage_profile_is_the_median_of_rounds_after_the_first_and_the_rest_is_other():
    rounds = [_round(9.0, advertise_keys=5.0, masked_input=3.0),  # round 1: start-up, left out
              _round(2.0, advertise_keys=0.1, masked_input=1.0),
              _round(3.0, advertise_keys=0.3, masked_input=1.2),
              _round(2.5, advertise_keys=0.2, masked_input=1.5)]
    profile = bench.stage_profile(rounds)
    assert profile == pytest.approx({"advertise_keys": 0.2, "masked_input": 1.2,
                                     "other": 0.9})  # 2.0-1.1, 3.0-1.5, 2.5-1.7
    assert bench.stage_profile([_round(1.0), _round(1.0)]) == {}  # a plain run has no stages


def test_the_summary_row_carries_the_median_stage_profile_of_its_runs():
    runs = [{"n": 5, "repeat": r, "variant": "medsilo secure", "status": "ok", "steady_s": s,
             "startup_s": 1.0, "round1_s": 2.0, "upload_bytes": 4.0,
             "stages_s": {"masked_input": s / 2, "unmask": 0.01 * (r + 1)}}
            for r, s in enumerate((1.0, 3.0, 2.0))]
    (row,) = bench.summarize(runs)
    assert row["stages_s"] == pytest.approx({"masked_input": 1.0, "unmask": 0.02})
    assert "by stage (s): masked_input 1.000, unmask 0.020" in bench.table([row])
