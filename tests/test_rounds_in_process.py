"""The real ServerApp and ClientApp for whole rounds, in this process (tests/in_process_grid.py):
the round loop, plain and secure aggregation, dropouts, refusals and the report, in seconds
and without Ray. The Ray engine itself is tested by the simulation tests (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.app import build_client_app
from privacy import protocol
from server.app import build_server_app
from server.settings import compose, site_node_config
from simulations.identities import simulation_identities
from simulations.sites import site_folders
from tests.in_process_grid import InProcessGrid, run_server

BASE = ("task=tabular", "num_hospitals=3", "rounds=2", "task.synthetic.train_size=60",
        "task.synthetic.test_size=30", "local_epochs=1", "baselines=none", "device=cpu")
NODE = 100  # node ids 100, 101, 102


def _federation(out: Path, *overrides: str, step_hook_for=None) -> tuple[dict, InProcessGrid]:
    """The config, and a grid of one node per synthetic site (as simulations/run.py builds)."""
    cfg = compose([*BASE, *overrides])
    folders = site_folders(cfg)
    identities = simulation_identities(out, folders) if cfg["secagg"]["name"] == "on" else {}
    sites = {i: {"site-id": site, "data-path": str(folder), "device": "cpu", "threads": 1,
                 "state-dir": str(out / "sites" / site), **site_node_config(cfg),
                 **identities.get(site, {})}
             for i, (site, folder) in enumerate(folders.items())}
    grid = InProcessGrid(build_client_app(sites, step_hook_for=step_hook_for),
                         {NODE + i: {"partition-id": i} for i in sites})
    return cfg, grid


def _run(cfg: dict, grid: InProcessGrid, out: Path, **server_options) -> dict:
    run_server(build_server_app(cfg, output_dir=out, **server_options), grid)
    return json.loads((out / "report.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    cfg, grid = _federation(out)
    return _run(cfg, grid, out), out


def test_plain_rounds_train_every_site_and_write_the_report(plain):
    report, out = plain
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for record in report["rounds"]:
        assert sorted(record["train"]) == ["hospital_01", "hospital_02", "hospital_03"]
        assert not record["failures"] and not record["refused"]
    assert sorted(report["final"]["sites"]) == ["hospital_01", "hospital_02", "hospital_03"]
    assert (out / "report.md").is_file() and (out / "checkpoint.npz").is_file()


def test_secure_aggregation_gives_the_plain_fedavg_model_up_to_quantization(plain, tmp_path):
    _, plain_out = plain
    cfg, grid = _federation(tmp_path, "secagg=on")
    report = _run(cfg, grid, tmp_path)
    for record in report["rounds"]:
        secure = record["secure_aggregation"]
        assert secure["aggregated"] == ["hospital_01", "hospital_02", "hospital_03"]
        assert not secure["dropped"] and secure["aborted"] is None
    kinds = {kind for _, kind in grid.delivered}
    assert f"train.{protocol.SECAGG_CONSISTENCY}" in kinds  # the active-server defence ran
    # the same seeds train the same local models; only the ring quantization differs
    secure, reference = _weights(tmp_path), _weights(plain_out)
    gap = max(float((secure[k] - reference[k]).abs().max()) for k in reference)
    assert gap < 1e-4, gap


def test_a_site_lost_mid_round_is_recovered_and_the_round_aggregates_the_others(tmp_path):
    cfg, grid = _federation(tmp_path, "secagg=on", "num_hospitals=4", "rounds=1")
    grid.drop[NODE + 3] = f"train.{protocol.SECAGG_MASKED_INPUT}"  # keys shared, then gone
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    assert record["secure_aggregation"]["aggregated"] == ["hospital_01", "hospital_02",
                                                          "hospital_03"]
    assert record["secure_aggregation"]["dropped"] == ["hospital_04"]


def test_a_site_gone_at_the_first_stage_leaves_the_round_room_for_a_later_dropout(tmp_path):
    """4 sites, threshold 3 of 4. One is gone before sending keys, one drops after sharing
    them: keys are agreed again among the 3 that answered (threshold 2 of 3), so the round
    aggregates the 2 survivors instead of aborting (issue 17: a refusing site and a lost one)."""
    cfg, grid = _federation(tmp_path, "secagg=on", "num_hospitals=4", "rounds=1")
    grid.drop[NODE + 3] = f"train.{protocol.SECAGG_ADVERTISE_KEYS}"  # gone before any key
    grid.drop[NODE + 2] = f"train.{protocol.SECAGG_MASKED_INPUT}"  # keys shared, then gone
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    secure = record["secure_aggregation"]
    assert secure["aborted"] is None
    assert secure["aggregated"] == ["hospital_01", "hospital_02"]
    assert secure["dropped"] == ["hospital_03"]
    assert record["timed_out"] == ["hospital_03", "node 103"]  # never answered: no site name
    advertised = [node for node, kind in grid.delivered
                  if kind == f"train.{protocol.SECAGG_ADVERTISE_KEYS}"]
    assert advertised == [100, 101, 102, 100, 101, 102]  # again, without the lost site


def test_sites_that_refuse_the_run_leave_the_model_untouched(tmp_path):
    cfg, grid = _federation(tmp_path, "site.require_dp=true", "rounds=1")
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    assert sorted(record["refused"]) == ["hospital_01", "hospital_02", "hospital_03"]
    assert not record["train"]
    assert {kind for _, kind in grid.delivered} <= {"train", "evaluate"}


def test_the_main_jobs_simulate_runs_on_the_in_process_grid(tmp_path, monkeypatch):
    """simulations/run.py ``simulate`` end to end (sites, identities, pooled evaluation,
    progress, report) with the in-process grid in place of Ray's engine."""
    import simulations.run as job
    from tests.in_process_grid import run_in_process

    monkeypatch.setattr(job, "run_in_process", run_in_process)
    report = job.simulate(compose([*BASE, "secagg=on"]), tmp_path)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert [r["secure_aggregation"]["aggregated"] for r in report["rounds"]] == \
        [["hospital_01", "hospital_02", "hospital_03"]] * 2
    assert report["run"]["global_evaluation"] == "pooled"
    assert report["final"]["global"] == report["rounds"][-1]["global"]  # the last round's model
    assert (tmp_path / "secagg-identities" / "roster.json").is_file()  # made on the fly
    for site in ("hospital_01", "hospital_02", "hospital_03"):
        assert (tmp_path / "sites" / site / "egress.jsonl").is_file()


def test_a_lost_site_is_not_waited_for_the_next_round_goes_on_without_it(tmp_path):
    cfg, grid = _federation(tmp_path, "connect_timeout_s=30")
    grid.drop[NODE + 2] = "evaluate"  # trains in round 1, then its SuperNode is gone
    report = _run(cfg, grid, tmp_path)  # would wait forever for 3 sites before issue 17
    first, second = report["rounds"]
    assert sorted(first["train"]) == ["hospital_01", "hospital_02", "hospital_03"]
    assert second["asked"] == 2 and sorted(second["train"]) == ["hospital_01", "hospital_02"]
    assert report["run"].get("stopped_early") is None


def test_too_few_sites_left_stops_cleanly_with_the_reason_and_the_last_checkpoint(tmp_path):
    cfg, grid = _federation(tmp_path, "connect_timeout_s=0.5", "min_sites=3")
    grid.drop[NODE + 2] = "evaluate"
    report = _run(cfg, grid, tmp_path)
    reason = report["run"]["stopped_early"]
    assert "round 2: 2 of 3 sites connected" in reason and "min_sites=3" in reason
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["skipped"] == reason and not report["rounds"][1]["train"]
    from server.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path).round == 1  # the last complete round, resumable


def test_a_hospital_that_never_connects_is_waited_for_only_until_the_timeout(tmp_path):
    cfg, grid = _federation(tmp_path, "connect_timeout_s=0.5", "rounds=1")
    grid.contexts.pop(NODE + 1)  # hospital_02's SuperNode never starts
    report = _run(cfg, grid, tmp_path)
    (record,) = report["rounds"]
    assert sorted(record["train"]) == ["hospital_01", "hospital_03"]


def test_under_secure_aggregation_the_reports_reply_ids_match_each_sites_egress_log(tmp_path):
    from client.egress import read_log

    cfg, grid = _federation(tmp_path, "secagg=on", "rounds=1")
    report = _run(cfg, grid, tmp_path)
    received = report["rounds"][0]["received"]
    for site in ("hospital_01", "hospital_02", "hospital_03"):
        log = read_log(tmp_path / "sites" / site / "egress.jsonl")
        ids = {entry["kind"]: entry["sha256"] for entry in log}
        assert received[site]["train"] == ids["masked-update"]  # what the site sent, exactly
        assert received[site]["evaluate"] == ids["metrics"]


@pytest.mark.parametrize("secagg", ["off", "on"])
def test_a_stop_during_a_round_drops_it_and_resume_gives_the_uninterrupted_model(
        plain, tmp_path, secagg):
    """Ctrl-C / SIGTERM (server/stopping.py) while round 2's sites train: the round is dropped,
    round 1's checkpoint stands, the report says why; resuming finishes the run with the model
    an uninterrupted run has (plain: exactly; secure: up to the ring's quantization)."""
    from server.checkpoint import load_checkpoint
    from server.stopping import StopSignal

    stop = StopSignal()

    def hook_for(site: str, server_round: int):
        if server_round == 2:  # the signal arrives in the middle of round 2's training
            return lambda *_: stop.request("SIGINT")
        return None

    cfg, grid = _federation(tmp_path, f"secagg={secagg}", "baselines=local",
                            step_hook_for=hook_for)
    report = _run(cfg, grid, tmp_path, stop=stop)
    assert report["run"]["stopped_early"] == ("stopped by SIGINT during round 2; round 1 "
                                              "complete and checkpointed")
    assert [r["round"] for r in report["rounds"]] == [1]
    assert load_checkpoint(tmp_path).round == 1
    assert report["baselines"]["computed"] is False and "SIGINT" in report["baselines"]["reason"]
    md = (tmp_path / "report.md").read_text()
    assert "stopped by SIGINT during round 2" in md

    cfg, grid = _federation(tmp_path, f"secagg={secagg}", f"resume={tmp_path}")
    report = _run(cfg, grid, tmp_path)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["run"]["stopped_early"] is None
    resumed, reference = _weights(tmp_path), _weights(plain[1])
    gap = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert gap <= (0 if secagg == "off" else 1e-4), gap


def test_an_error_reply_flower_makes_for_a_lost_node_names_that_node():
    """The SuperLink answers for a node whose heartbeats stopped ("Node Unavailable"), and the
    deployed grid for a reply whose upload never completed: from node 1, not from the site."""
    import time as clock

    from flwr.app import Error, Message, Metadata, RecordDict

    from privacy.compat import server_task_identity
    from server.strategy import read_replies

    with server_task_identity(1, 1):  # what Message() reads in a ServerApp
        sent = Message(RecordDict(), dst_node_id=42, message_type="evaluate", group_id="2")
    sent.metadata.__dict__["_message_id"] = "m42"  # as the grid sets it when pushing
    made_by_flower = Message(metadata=Metadata(
        run_id=1, message_id="e1", src_node_id=1, dst_node_id=1, reply_to_message_id="m42",
        group_id="2", created_at=clock.time(), ttl=60, message_type="evaluate"),
        error=Error(code=0, reason="Node Unavailable"))
    (failure,) = read_replies([made_by_flower], "evaluate", sent=[sent]).failures
    assert failure["node_id"] == 42 and failure["reason"] == "Node Unavailable"
    assert read_replies([made_by_flower], "evaluate").failures[0]["node_id"] == 1  # unmatched
