"""privacy=site_dp end to end (issue 20): hospital-level DP with the noise added by the sites
inside secure aggregation. The real ServerApp and ClientApp in this process
(tests/in_process_grid.py), a few tiny sites, seconds per run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from client.site import SiteSettings
from client.site_dp import (
    LIFETIME_FILE,
    lifetime_epsilon,
    lifetime_refusal,
    record_lifetime,
    round_refusal,
    site_plan,
    worst_round_rdp,
)
from models import build_model
from privacy import protocol
from privacy.run_settings import HospitalPrivacySettings, RunSettings, TrainSettings
from privacy.secagg import messages as secagg_messages
from privacy.site_dp import epsilon, plan
from privacy.site_dp.accounting import worst_case_epsilon
from server.settings import ConfigError, compose
from tests.in_process_grid import simulate_in_process
from tests.test_rounds_in_process import NODE, _federation, _run

# ε = 8: six tiny sites, two rounds (the default 4 is for larger federations: docs/site_dp.md)
SITE_DP = ("task=tabular", "privacy=site_dp", "secagg=on", "num_hospitals=6",
           "task.synthetic.train_size=60", "task.synthetic.test_size=20",
           "privacy.target_epsilon=8")


def _model_size(cfg: dict) -> int:
    model = build_model(cfg["model"], cfg["task"]["spec"])
    return sum(p.numel() for p in model.state_dict().values())


def _independent_plan(cfg: dict, threshold: int):
    """The plan from the documented public values, not from medsilo's settings code."""
    return plan(target_epsilon=8.0, delta=1e-5, clip=0.5, dim=_model_size(cfg), num_sites=6,
                sites_per_round=6, threshold=threshold, rounds=int(cfg["rounds"]))


@pytest.fixture(scope="module")
def site_dp_run(tmp_path_factory):
    """``python -m simulations.run`` with the sites in this process (pooled global metrics)."""
    out = tmp_path_factory.mktemp("site_dp")
    overrides = (*SITE_DP, "rounds=2", "device=cpu", f"data.cache_dir={out / 'cache'}")
    return compose(list(overrides)), simulate_in_process(out, *overrides), out


def test_report_has_the_hospital_level_epsilon_of_the_survivors_summed(site_dp_run):
    cfg, report, out = site_dp_run
    hospital = report["hospital_privacy"]
    survivors = [len(r["secure_aggregation"]["aggregated"]) for r in report["rounds"]]
    assert survivors == [6, 6]
    # the default threshold: the SecAgg quorum of a full cohort of 6, 6 // 2 + 1
    expected = epsilon(_independent_plan(cfg, threshold=4), survivors)
    assert hospital["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert 0 < hospital["epsilon"] <= hospital["planned_epsilon"] <= 8.0 + 1e-9
    assert hospital["threshold"] == 4 and hospital["adjacency"].startswith("zero-out")
    assert [r["survivors"] for r in hospital["rounds"]] == survivors
    assert report["run"]["hospital_privacy"] == "site_dp" and report["run"]["privacy"] == "off"
    text = (out / "report.md").read_text()
    assert "hospital-level differential privacy" in text.splitlines()[2]
    assert f"ε = {hospital['epsilon']:.2f}" in text.splitlines()[2]
    assert "### Hospital level (privacy=site_dp)" in text


def test_the_noisy_unweighted_mean_still_improves_the_model(site_dp_run):
    _, report, _ = site_dp_run
    before = report["initial"]["global"]["auroc"]
    after = report["final"]["global"]["auroc"]
    assert after > before + 0.05 and after > 0.6, (before, after)


def test_nothing_about_a_sites_round_leaves_it_in_the_clear(site_dp_run):
    _, report, _ = site_dp_run
    for record in report["rounds"]:
        assert len(record["train"]) == 6
        for metrics in record["train"].values():  # no loss, no count, no clipped flag
            assert metrics.get("num_examples", 0) == 0, metrics
            assert not set(metrics) - {"num_examples"}, metrics


def test_dropouts_down_to_the_threshold_stay_within_the_plan_and_are_reported(tmp_path):
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1")
    for node in (NODE + 4, NODE + 5):  # keys shared, then gone: 4 of 6 survive
        grid.drop[node] = f"train.{protocol.SECAGG_MASKED_INPUT}"
    report = _run(cfg, grid, tmp_path)
    hospital = report["hospital_privacy"]
    (entry,) = hospital["rounds"]
    assert entry["survivors"] == 4 == hospital["threshold"]
    assert entry["noise"]["variance_removed_by_dropouts"] == pytest.approx(2 / 6)
    assert hospital["epsilon"] <= hospital["planned_epsilon"] + 1e-9
    assert hospital["epsilon"] == pytest.approx(
        epsilon(_independent_plan(cfg, threshold=4), [4]), rel=1e-9)
    assert "33%" in hospital["noise_removed_by_dropouts"]


def test_a_site_refuses_a_target_epsilon_above_its_own_cap(tmp_path):
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", "site.max_hospital_epsilon=3")
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    assert len(record["refused"]) == 6
    for reason in record["refused"].values():
        assert "max_hospital_epsilon 3" in reason and "epsilon 8" in reason
    assert report["hospital_privacy"]["epsilon"] == 0  # nothing was released


def _settings(threshold: int, **changes) -> RunSettings:
    hospital = HospitalPrivacySettings(target_epsilon=4.0, delta=1e-5, clip=0.5, num_sites=20,
                                       sites_per_round=10, threshold=threshold)
    values = {"task": {"name": "tabular"}, "model": {"name": "mlp"},
              "train": TrainSettings(1, 8, 0.1), "rounds": 5, "server_round": 1,
              "hospital_privacy": hospital, **changes}
    return RunSettings(**values)


def _secagg_state(participants: int, threshold: int) -> dict:
    return {secagg_messages.NUM_PARTICIPANTS: participants, secagg_messages.THRESHOLD: threshold}


def test_a_site_refuses_a_threshold_above_the_secagg_floor_it_signs():
    """10 participants, SecAgg t = 6: the site signs survivor sets of >= max(6, 6) members, so a
    plan counting on 7 survivors would put too little noise in a sum of 6."""
    settings = _settings(threshold=7)
    reason = round_refusal(settings.hospital_privacy, settings, _secagg_state(10, 6), 0)
    assert reason is not None and "hospital_privacy.threshold 7" in reason and "(6" in reason
    fits = _settings(threshold=6)
    assert round_refusal(fits.hospital_privacy, fits, _secagg_state(10, 6), 0) is None


def test_a_site_refuses_more_participants_or_rounds_than_planned():
    settings = _settings(threshold=6)
    more = round_refusal(settings.hospital_privacy, settings, _secagg_state(12, 7), 0)
    assert more is not None and "sites_per_round 10" in more
    spent = round_refusal(settings.hospital_privacy, settings, _secagg_state(10, 6), 5)
    assert spent is not None and "5 of the 5 rounds" in spent


def test_a_site_refuses_a_plan_other_than_the_one_it_already_contributed_under():
    """A server that asks for rounds=1, then rounds=2, ... would have each round noised for a
    whole budget: after its first contribution the site holds the run to that plan."""
    from flwr.app import RecordDict

    from client.site_dp import contributions, pinned_plan, record_contribution

    first = _settings(threshold=6, rounds=1)
    state = RecordDict()
    assert round_refusal(first.hospital_privacy, first, _secagg_state(10, 6),
                         contributions(state), pinned_plan(state)) is None
    record_contribution(state, first)
    longer = _settings(threshold=6, rounds=2, server_round=2)
    reason = round_refusal(longer.hospital_privacy, longer, _secagg_state(10, 6),
                           contributions(state), pinned_plan(state))
    assert reason is not None and "not the one this site already contributed under" in reason
    looser = _settings(threshold=5, rounds=1)
    assert round_refusal(looser.hospital_privacy, looser, _secagg_state(10, 6), 0,
                         pinned_plan(state)) is not None
    same = _settings(threshold=6, rounds=2, server_round=2)
    record_contribution(again := RecordDict(), same)
    assert round_refusal(same.hospital_privacy, same, _secagg_state(10, 6),
                         contributions(again), pinned_plan(again)) is None


def test_privacy_site_dp_without_secure_aggregation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"secagg must be 'on' with privacy=site_dp"):
        compose(["privacy=site_dp", "secagg=off"])


def test_a_threshold_the_secagg_floor_cannot_back_is_a_config_error():
    with pytest.raises(ConfigError, match=r"privacy.threshold must be null or an integer in "
                                          r"\[1, 3\]"):
        compose(["privacy=site_dp", "secagg=on", "num_hospitals=4", "privacy.threshold=4"])


def test_record_level_dp_composes_with_the_hospital_level_plan():
    cfg = compose(["privacy=site_dp", "secagg=on", "privacy.record_level=dp",
                   "privacy.record_dp.target_epsilon=3"])
    assert cfg["privacy"]["name"] == "dp" and cfg["privacy"]["target_epsilon"] == 3
    assert cfg["hospital_privacy"]["name"] == "site_dp"
    assert cfg["hospital_privacy"]["target_epsilon"] == 4.0


def test_the_site_policy_key_is_read_from_site_toml(tmp_path: Path):
    path = tmp_path / "site.toml"
    path.write_text(f'data_path = "{tmp_path}"\nmax_hospital_epsilon = 2.5\n')
    assert SiteSettings.from_file(path).max_hospital_epsilon == 2.5
    path.write_text(f'data_path = "{tmp_path}"\nmax_hospital_epsilon = -1\n')
    with pytest.raises(ValueError, match="max-hospital-epsilon must be > 0"):
        SiteSettings.from_file(path)


def test_the_hospital_settings_travel_to_the_site_unchanged():
    settings = _settings(threshold=6)
    decoded = protocol.decode_run_settings(protocol.encode_run_settings(settings))
    assert decoded.hospital_privacy == settings.hospital_privacy
    assert math.isclose(decoded.hospital_privacy.target_epsilon, 4.0)
    assert json.dumps(settings.to_dict())  # plain values only


def test_a_site_lost_before_the_keys_still_leaves_a_round_backed_by_the_plan(tmp_path):
    """6 asked, one gone before sending keys: the 5 left agree keys again, with the SecAgg
    threshold raised to the plan's 4 (not a majority of 5, 3), so every site's check passes and
    the sum of the 5 is released."""
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1")
    grid.drop[NODE + 5] = f"train.{protocol.SECAGG_ADVERTISE_KEYS}"
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    assert record["secure_aggregation"]["aborted"] is None and not record["refused"]
    assert report["hospital_privacy"]["rounds"][0]["survivors"] == 5


def test_adaptive_clipping_moves_the_public_clip_from_the_noisy_count(tmp_path):
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=2", "privacy.count_noise_std=2")
    report = _run(cfg, grid, tmp_path)
    hospital = report["hospital_privacy"]
    first, second = hospital["rounds"]
    assert hospital["adaptive_clipping"] and first["clip"] == 0.5
    assert second["clip"] == pytest.approx(first["next_clip"]) != 0.5
    assert -1 < first["unclipped_fraction"] < 2  # noisy share, std 2/6 around the true one
    assert hospital["epsilon"] <= hospital["planned_epsilon"] + 1e-9


def test_record_level_dp_sgd_runs_beside_it_with_its_own_ledgers(tmp_path):
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", "privacy.record_level=dp")
    report = _run(cfg, grid, tmp_path)
    assert report["run"]["privacy"] == "dp" and report["hospital_privacy"]["epsilon"] > 0
    ledgers = report["privacy"]
    assert len(ledgers) == 6 and all(led["dp"] and led["epsilon"] > 0 for led in ledgers.values())
    first = (tmp_path / "report.md").read_text().splitlines()[2]
    assert "hospital-level differential privacy" in first and "each patient record" in first


def test_same_seed_same_metrics(site_dp_run, tmp_path):
    _, report, _ = site_dp_run
    overrides = (*SITE_DP, "rounds=2", "device=cpu", f"data.cache_dir={tmp_path / 'cache'}")
    again = simulate_in_process(tmp_path, *overrides)
    assert again["final"]["global"] == report["final"]["global"]


def test_the_benchmark_summary_pairs_each_site_dp_row_with_the_secure_rows():
    from simulations.benchmarks.site_dp import SECURE, schedule, summarize, table

    assert schedule([100], [2.0], 2) == [(100, 0, None), (100, 0, 2.0), (100, 1, None),
                                         (100, 1, 2.0)]
    runs = [{"sites": 100, "repeat": r, "variant": v, "status": "ok", "auroc": a,
             "steady_s": s, "epsilon": e}
            for r, v, a, s, e in ((0, SECURE, 0.8, 2.0, None), (0, "site_dp eps=2", 0.7, 3.0, 1.4),
                                  (1, SECURE, 0.9, 4.0, None), (1, "site_dp eps=2", 0.6, 5.0, 1.5),
                                  (2, "site_dp eps=2", None, None, None))]
    runs[-1]["status"] = "exit 1"
    secure, site_dp = summarize(runs)
    assert secure["auroc"] == pytest.approx(0.85) and "cost_ratio" not in secure
    assert site_dp["ok"] == 2 and site_dp["runs"] == 3
    assert site_dp["cost_ratio"] == pytest.approx(4.0 / 3.0)
    assert site_dp["paired_ratios"] == pytest.approx([1.5, 1.25])
    assert "1.33× (pairs 1.50, 1.25)" in table([secure, site_dp])


def test_a_site_with_a_hospital_budget_refuses_a_run_without_hospital_level_dp():
    from client.policy import refusal_reason

    site = SiteSettings(site_id="h", data_path=Path("."), require_approval=False,
                        require_dp=False, simulated=True, max_hospital_epsilon=4.0)
    without = _settings(threshold=6, hospital_privacy=None)
    reason = refusal_reason(site, without)
    assert reason is not None and "requires hospital-level DP" in reason
    assert refusal_reason(site, _settings(threshold=6)) is None


def test_a_plain_train_message_of_a_site_dp_run_is_refused_before_training(tmp_path):
    """An active server sends the site_dp run's settings in a plain ``train`` message (not the
    masked-input stage): the update would leave without its noise share. Refused, no model."""
    import time

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import HOSPITAL_DP_ONLY_MASKED, build_client_app
    from server.app import initial_model
    from server.settings import site_node_config, site_settings

    cfg = compose([*SITE_DP, "rounds=1", f"data.cache_dir={tmp_path / 'cache'}"])
    settings = site_settings(cfg)
    assert settings.hospital_privacy is not None
    from simulations.sites import site_folders

    folder = next(iter(site_folders(cfg).values()))
    node = {"site-id": "hospital_01", "data-path": str(folder), "state-dir": str(tmp_path / "s"),
            "device": "cpu", "threads": 1, **site_node_config(cfg)}
    app = build_client_app({0: node})
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(initial_model(cfg).state_dict()),
        protocol.CONFIG: ConfigRecord({**protocol.encode_run_settings(settings),
                                       protocol.SERVER_ROUND: 1})})
    metadata = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60,
                        message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    reply = app(message=Message(metadata=metadata, content=content), context=context)
    site = reply.content[protocol.SITE]
    assert site[protocol.STATUS] == protocol.STATUS_REFUSED
    assert HOSPITAL_DP_ONLY_MASKED in str(site[protocol.REASON])
    assert protocol.ARRAYS not in reply.content


def test_the_console_header_names_the_hospital_level_target():
    from simulations.run import privacy_label

    assert privacy_label(compose(list(SITE_DP))) == "site_dp (hospital-level ε target 8)"
    both = compose([*SITE_DP, "privacy.record_level=dp"])
    assert privacy_label(both) == "site_dp (hospital-level ε target 8) + record-level dp"
    assert privacy_label(compose(["task=tabular"])) == "off"


def test_compare_and_tracking_show_the_hospital_level_epsilon(site_dp_run):
    """A researcher's tools carry the federation's ε beside the per-site ones."""
    from simulations import compare, tracking

    _, report, out = site_dp_run
    hospital = report["hospital_privacy"]
    run = compare.load_run(out / "report.json")
    assert run.hospital_epsilon == hospital["epsilon"] and run.epsilon is None  # no DP-SGD
    header, rows = compare.table([run])
    column = header.index("hospital-level epsilon (site_dp)")
    assert rows[0][column] == compare._cell(hospital["epsilon"])
    per_round = [(step, value) for key, value, step, _ in tracking.round_metrics(report)
                 if key == "hospital_epsilon"]
    assert per_round == [(r["round"], r["epsilon_after"]) for r in hospital["rounds"]]
    assert per_round[-1][1] == pytest.approx(hospital["epsilon"])
    assert tracking.summary_metrics(report)["final_hospital_epsilon"] == hospital["epsilon"]


def test_each_round_record_carries_the_hospital_epsilon_the_report_gives_for_it(site_dp_run):
    """The console's round line reads it from the round record as the round ends."""
    _, report, _ = site_dp_run
    for entry, record in zip(report["hospital_privacy"]["rounds"], report["rounds"], strict=True):
        assert record["secure_aggregation"]["site_dp"]["epsilon_after"] == pytest.approx(
            entry["epsilon_after"], rel=1e-12)


def test_without_record_level_dp_a_patient_is_not_claimed_the_hospital_epsilon(site_dp_run):
    """Zero-out adjacency bounds a hospital's update against nothing; one changed record
    replaces the update by another (up to 2x the clip apart): the report must not give a
    patient ε itself."""
    _, _, out = site_dp_run
    opening = (out / "report.md").read_text().splitlines()[2]
    assert "No record-level DP-SGD ran" in opening and "about 2ε" in opening


def test_a_site_refuses_a_delta_above_its_own_ceiling_whatever_num_sites_the_server_claims():
    """num_sites is the server's word: understating it (6 sites claimed) would let delta rise
    to 1/6. The site's own max_hospital_delta (default 1e-5) holds whatever num_sites says."""
    from client.policy import hospital_privacy_refusal

    site = SiteSettings(site_id="h", data_path=Path("."), require_approval=False,
                        require_dp=False, simulated=True)
    loose = HospitalPrivacySettings(target_epsilon=4.0, delta=0.1, clip=0.5, num_sites=6,
                                    sites_per_round=6, threshold=4)
    reason = hospital_privacy_refusal(site, loose)
    assert reason is not None and "max_hospital_delta 1e-05" in reason
    plain = HospitalPrivacySettings(target_epsilon=4.0, delta=1e-5, clip=0.5, num_sites=6,
                                    sites_per_round=6, threshold=4)
    assert hospital_privacy_refusal(site, plain) is None
    wider = SiteSettings.from_node_config({"site-id": "h", "data-path": ".",
                                           "max-hospital-delta": 0.15}, simulation=True)
    assert wider.max_hospital_delta == 0.15
    assert hospital_privacy_refusal(wider, loose) is None


def test_a_site_keeps_its_hospital_level_budget_across_runs(tmp_path):
    """A new run has a fresh Context.state: without the state_dir ledger a server could start
    run after run, each within the site's cap. The second run is refused by every site."""
    cap = ("site.max_hospital_epsilon=8",)
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", *cap)
    first = _run(cfg, grid, tmp_path)
    assert not first["rounds"][0]["refused"]
    ledger = json.loads((tmp_path / "sites" / "hospital_01" / LIFETIME_FILE).read_text())
    (entry,) = ledger["contributions"]
    # one run's charge is the plan's worst case: exactly what the site allowed
    plan_ = _independent_plan(cfg, threshold=int(cfg["hospital_privacy"]["threshold"]))
    assert lifetime_epsilon(ledger["contributions"])[0] == pytest.approx(
        worst_case_epsilon(plan_), rel=1e-9)
    assert entry["delta"] == 1e-5 and entry["round"] == 1
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", *cap)  # a new run, same sites
    second = _run(cfg, grid, tmp_path)
    (record,) = second["rounds"]
    assert len(record["refused"]) == 6
    for reason in record["refused"].values():
        assert "over all runs" in reason and "max_hospital_epsilon 8" in reason, reason
    after = json.loads((tmp_path / "sites" / "hospital_01" / LIFETIME_FILE).read_text())
    assert after["contributions"] == ledger["contributions"]  # nothing more was charged


def test_an_unreadable_hospital_ledger_is_refused_naming_the_file(tmp_path):
    site = SiteSettings(site_id="h", data_path=tmp_path, require_approval=False,
                        require_dp=False, simulated=False, state_dir=tmp_path,
                        max_hospital_epsilon=4.0)
    settings = _settings(threshold=6)
    plan_ = site_plan(settings.hospital_privacy, settings.rounds, 100)
    assert lifetime_refusal(site, plan_) is None
    assert record_lifetime(site, settings, plan_, run_id=1) == pytest.approx(
        lifetime_epsilon([{"rdp": list(worst_round_rdp(plan_)), "delta": 1e-5}])[0])
    (tmp_path / LIFETIME_FILE).write_text('{"version": 1, "orders": [2, 3]}')
    reason = lifetime_refusal(site, plan_)
    assert reason is not None and LIFETIME_FILE in reason and "RDP orders" in reason
    (tmp_path / LIFETIME_FILE).write_text("{not json")
    reason = lifetime_refusal(site, plan_)
    assert reason is not None and "not readable as JSON" in reason and "expected" in reason


def test_the_charge_rechecks_the_cap_under_a_lock_so_concurrent_runs_cannot_share_it(tmp_path):
    """The check before training and the charge before sending are apart by a whole local
    training: another run at the same site (a server may start two at once) may have charged
    the ledger in between. The charge itself refuses to go over the cap; nothing is written."""
    settings = _settings(threshold=6)
    plan_ = site_plan(settings.hospital_privacy, settings.rounds, 100)
    one_round = lifetime_epsilon([{"rdp": list(worst_round_rdp(plan_)), "delta": 1e-5}])[0]
    site = SiteSettings(site_id="h", data_path=tmp_path, require_approval=False,
                        require_dp=False, simulated=False, state_dir=tmp_path,
                        max_hospital_epsilon=one_round * (1 + 1e-6))
    assert lifetime_refusal(site, plan_) is None  # run A checks: one round fits
    assert lifetime_refusal(site, plan_) is None  # run B checks: the same ledger, fits too
    record_lifetime(site, settings, plan_, run_id=1)  # run B charges first
    before = (tmp_path / LIFETIME_FILE).read_bytes()
    with pytest.raises(RuntimeError, match="over all runs"):
        record_lifetime(site, settings, plan_, run_id=2)  # run A's share must not leave
    assert (tmp_path / LIFETIME_FILE).read_bytes() == before


def test_a_deployed_site_without_a_state_dir_cannot_contribute_outside_the_ledger(tmp_path):
    """The across-runs ledger lives in the state_dir: a deployed site without one is refused
    by its policy before any data is read, and the charge itself refuses too (never a share
    that no ledger counted)."""
    from client.policy import refusal_reason

    settings = _settings(threshold=6)
    site = SiteSettings(site_id="h", data_path=tmp_path, require_approval=False,
                        require_dp=False, simulated=False, max_hospital_epsilon=8.0)
    reason = refusal_reason(site, settings)
    assert reason is not None and "no state_dir" in reason
    plan_ = site_plan(settings.hospital_privacy, settings.rounds, 100)
    with pytest.raises(RuntimeError, match="state_dir"):
        record_lifetime(site, settings, plan_, run_id=1)
    with_dir = dataclasses.replace(site, state_dir=tmp_path / "state")
    assert refusal_reason(with_dir, settings) is None


def test_the_egress_log_says_each_masked_update_carried_the_sites_noise_share(site_dp_run):
    from client import egress

    cfg, report, out = site_dp_run
    log_path = out / "sites" / "hospital_01" / egress.EGRESS_LOG
    updates = [e for e in egress.read_log(log_path) if e.get("model_update")]
    assert len(updates) == 2  # one masked share per round
    planned = report["hospital_privacy"]["planned_epsilon"]
    for entry in updates:
        assert entry["kind"] == "masked-update" and entry["masked"] is True
        assert entry["hospital_dp"] is True and not entry["dp_sgd"]
        assert entry["hospital_epsilon"] == pytest.approx(planned, rel=1e-9)
    text = egress.render_summary(egress.summarize(egress.read_log(log_path)), str(log_path))
    assert "with a hospital-level DP noise share: 2 of 2" in text
    assert f"hospital-level DP noise share added at the site (planned ε ≤ {planned:.3g})" in text
    assert "NOT DP-noised" not in text


def test_a_charge_refused_at_the_last_moment_is_a_refusal_and_no_share_leaves(tmp_path,
                                                                             monkeypatch):
    """Another run charged the ledger between the check before training and the charge: the
    site replies with a refusal naming the reason (not an error), and charges nothing."""
    import client.site_dp as site_dp

    cap = ("site.max_hospital_epsilon=8",)
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", *cap)
    _run(cfg, grid, tmp_path)
    ledger = (tmp_path / "sites" / "hospital_01" / LIFETIME_FILE).read_text()
    monkeypatch.setattr(site_dp, "lifetime_refusal", lambda *_: None)  # the check "passed"
    cfg, grid = _federation(tmp_path, *SITE_DP, "rounds=1", *cap)
    (record,) = _run(cfg, grid, tmp_path)["rounds"]
    assert len(record["refused"]) == 6 and not record["failures"], record
    assert all("over all runs" in reason for reason in record["refused"].values())
    assert (tmp_path / "sites" / "hospital_01" / LIFETIME_FILE).read_text() == ledger
