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


def _timed(first_round_s, rss=100.0, status="ok"):
    return {**_row(10, status=status, rss=rss), "time_to_first_round_s": first_round_s,
            "first_round_s": 2.0, "median_round_s": 0.5, "repeat": 0,
            "peak_private_rss_mb": rss, "peak_object_store_mb": 0.0, "peak_processes": 3}


def test_the_many_sites_repeats_and_flower_stock_give_medians_mins_and_ratios():
    ours = many_sites.combine_repeats([_timed(12.0, rss=300.0), _timed(10.0), _timed(30.0),
                                       _timed(None, status="failed: exit code 1")])
    assert ours["time_to_first_round_s"] == 12.0 and ours["time_to_first_round_min_s"] == 10.0
    assert ours["peak_rss_tree_mb"] == 300.0 and ours["repeats"] == 3
    assert ours["failed_repeats"] == ["failed: exit code 1"]
    stock = many_sites.combine_repeats([_timed(4.0), _timed(6.0)])
    row = many_sites.compare_with_stock(ours, stock)
    assert row["stock_ratio_first_round"] == pytest.approx(12.0 / 5.0, abs=0.01)
    assert row["stock_ratio_first_round_min"] == pytest.approx(10.0 / 4.0, abs=0.01)
    assert any(line.startswith("start-up: FAIL: time to first round is 2.40x")
               for line in many_sites.verdict([row]))
    fast = many_sites.compare_with_stock(many_sites.combine_repeats([_timed(5.5)]), stock)
    assert any(line.startswith("start-up: PASS") for line in many_sites.verdict([fast]))


def test_the_flower_stock_mlp_has_as_many_parameters_as_our_model():
    from models import build_model
    from server.settings import compose
    from simulations.benchmarks.flower_stock import stock_mlp

    args, overrides = many_sites.parse_args(["--sites", "10"])
    spec = many_sites.stock_spec(args, overrides)
    cfg = compose(["task=tabular"])
    ours = build_model(cfg["model"], cfg["task"]["spec"])
    assert (sum(p.numel() for p in stock_mlp(spec).parameters())
            == sum(p.numel() for p in ours.parameters()))
    args, overrides = many_sites.parse_args(["--sites", "10", "--task", "images"])
    assert isinstance(many_sites.stock_spec(args, overrides), str)  # no stock counterpart


def test_the_secagg_round_benchmark_interleaves_variants_and_leaves_out_round_one(tmp_path):
    import json

    from simulations.benchmarks import secure_aggregation as bench

    assert bench.schedule([5, 20], 2, ("A", "B")) == [
        (5, 0, "A"), (5, 0, "B"), (5, 1, "A"), (5, 1, "B"),
        (20, 0, "A"), (20, 0, "B"), (20, 1, "A"), (20, 1, "B")]
    assert bench.steady_round([30.0, 2.0, 4.0, 3.0]) == 3.0
    assert bench.steady_round([30.0]) is None
    for site, sizes in {"h1": [100, 7, 50], "h2": [300, 9, 50]}.items():
        (tmp_path / site).mkdir()
        lines = [json.dumps({"site": site, "message_type": kind, "bytes": size})
                 for kind, size in zip(["train.secagg_masked_input", "evaluate", "train"],
                                       sizes)]
        (tmp_path / site / "egress.jsonl").write_text("\n".join(lines) + "\n")
    assert bench.egress_upload(tmp_path, rounds=2) == (150 + 350) / 2 / 2  # evaluate left out


def test_the_secagg_round_benchmark_ratio_is_of_medians_and_its_verdict_follows():
    from simulations.benchmarks import secure_aggregation as bench

    def run(variant, repeat, steady, status="ok"):
        return {"n": 5, "repeat": repeat, "variant": variant, "status": status,
                "steady_s": steady, "startup_s": 10.0, "round1_s": 12.0, "upload_bytes": 4.0}

    runs = [run("medsilo plain", 0, 1.0), run("medsilo secure", 0, 1.6),
            run("medsilo plain", 1, 2.0), run("medsilo secure", 1, 2.2),
            run("medsilo plain", 2, 1.5), run("medsilo secure", 2, 9.9, status="exit 1")]
    rows = {row["variant"]: row for row in bench.summarize(runs)}
    plain, secure = rows["medsilo plain"], rows["medsilo secure"]
    assert (plain["steady_median_s"], plain["steady_min_s"]) == (1.5, 1.0)
    assert secure["steady_median_s"] == pytest.approx(1.9)  # the failed run is not a number
    assert secure["ratio"] == pytest.approx(1.9 / 1.5)
    assert secure["pair_ratios"] == [1.6, 1.1] and secure["failures"] == ["exit 1"]
    assert bench.verdict(list(rows.values())) == [
        "n=5: PASS: secure/plain steady round 1.27x (target <= 1.5x)"]


def test_the_many_sites_dp_comparison_divides_dp_by_no_dp_and_skips_failed_runs():
    from simulations.benchmarks.many_sites import compare_with_dp

    ours = {"status": "ok", "total_wall_s": 100.0, "time_to_first_round_s": 20.0,
            "median_round_s": 2.0}
    dp = {"status": "ok", "total_wall_s": 130.0, "time_to_first_round_s": 25.0,
          "median_round_s": 3.0}
    row = compare_with_dp(ours, dp)
    assert (row["dp_ratio_total"], row["dp_ratio_first_round"], row["dp_ratio_median_round"]) \
        == (1.3, 1.25, 1.5)
    assert row["dp"] is dp and row["total_wall_s"] == 100.0
    failed = compare_with_dp(ours, {"status": "timed out after 7200 s"})
    assert failed["dp_ratio_total"] is None


def test_the_shamir_comparison_runs_flowers_own_functions_reached_through_compat(monkeypatch):
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    from privacy import compat

    monkeypatch.delattr(compat, "flower_shamir", raising=False)
    assert "compat has no flower_shamir()" in secagg_benchmark.compare_shamir(5, 1)["flower"]
    monkeypatch.setattr(compat, "flower_shamir", lambda: (create_shares, combine_shares),
                        raising=False)
    times = secagg_benchmark.compare_shamir(5, repeats=1)  # each reconstructs its secrets
    assert all(t > 0 for t in times["medsilo"]) and all(t > 0 for t in times["flower"])


def test_the_secagg_round_benchmark_says_why_flowers_rows_are_not_measured(monkeypatch):
    from privacy import compat
    from simulations.benchmarks import secure_aggregation as bench

    monkeypatch.delattr(compat, "flower_legacy_api", raising=False)
    run = {"n": 3, "repeat": 0, "variant": "flower secagg+", **bench.run_flower(3, 2, True)}
    assert run["status"].startswith("not measured: ") and "compat" in run["status"]
    (row,) = bench.summarize([run])
    assert row["steady_median_s"] is None and row["ok"] == 0
    assert "not measured: " in bench.table([row])
