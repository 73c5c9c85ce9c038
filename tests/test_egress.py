"""The egress log: every reply a site sends is logged before it leaves, and nothing bypasses it."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client import egress
from client.app import build_client_app
from client.approval import running_app_hash
from client.egress import EGRESS_LOG, read_log, summarize
from client.site import SiteSettings
from privacy import protocol
from privacy.protocol import content_size
from privacy.run_settings import PrivacySettings
from server.app import initial_model
from server.settings import site_settings
from tests.helpers import ROOT

RUN_ID = 42


@pytest.fixture(scope="module")
def cfg(small_tabular_cfg):
    return small_tabular_cfg


@pytest.fixture(scope="module")
def site_folder(small_tabular_site):
    return small_tabular_site


def _incoming(cfg, message_type: str, server_round: int = 1, privacy: bool = False) -> Message:
    """A message as the SuperLink delivers it to a site."""
    settings = site_settings(cfg)
    if not privacy:
        settings = dataclasses.replace(settings, privacy=PrivacySettings())
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(initial_model(cfg).state_dict()),
        protocol.CONFIG: ConfigRecord({**protocol.encode_run_settings(settings),
                                       protocol.SERVER_ROUND: server_round}),
    })
    metadata = Metadata(run_id=RUN_ID, message_id=f"m-{message_type}-{server_round}",
                        src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(metadata=metadata, content=content)


def _context(node_config) -> Context:
    return Context(run_id=RUN_ID, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def _deployed(site_folder, state, **extra):
    # these sites allow runs without DP (a deployed site requires DP unless it says so)
    return {"site-id": "hospital_x", "data-path": str(site_folder), "state-dir": str(state),
            "threads": 1, "require-dp": False, **extra}


def test_no_reply_is_built_outside_the_egress_door():
    """Only client/egress.py constructs a Flower Message in client/."""
    offenders = []
    for path in sorted((ROOT / "client").rglob("*.py")):
        if path.name == "egress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in ("Message", "make_message", "create_reply", "create_error_reply"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_train_and_evaluate_replies_are_logged_with_the_content_flower_ships(
        cfg, site_folder, tmp_path):
    app = build_client_app()
    context = _context(_deployed(site_folder, tmp_path, **{
        "approved-app-hashes": running_app_hash()}))
    replies = [app(message=_incoming(cfg, "train"), context=context),
               app(message=_incoming(cfg, "evaluate"), context=context)]
    # logging measured a copy: the update leaves once, without Flower's cached chunk copies
    # (measuring the reply itself made the engine ship 2x its bytes)
    import ray.cloudpickle as cloudpickle  # how Flower's engine ships a reply back

    arrays = replies[0].content[protocol.ARRAYS]
    raw = sum(len(a.data) for a in arrays.values())
    assert len(cloudpickle.dumps(arrays)) < raw * 1.05 + 4096
    entries = read_log(tmp_path / EGRESS_LOG)
    assert [(e["message_type"], e["kind"]) for e in entries] == [
        ("train", "update"), ("evaluate", "metrics")]
    for reply, entry in zip(replies, entries, strict=True):
        assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
        assert entry["sha256"] == reply.content.object_id
        assert (entry["bytes"], entry["records"]) == content_size(reply.content)
        assert (entry["run_id"], entry["round"], entry["site"]) == (RUN_ID, 1, "hospital_x")
    assert set(entries[0]["records"]) == {"arrays", "metrics", "site"}
    assert entries[0]["records"]["arrays"] > 10 * entries[1]["bytes"]  # the model dominates


def test_an_unapproved_app_is_refused_before_any_data_is_read(cfg, tmp_path):
    app = build_client_app()
    # the data folder does not even exist: a refusal proves nothing was read
    context = _context(_deployed(tmp_path / "no-such-folder", tmp_path,
                                 **{"approved-app-hashes": "f" * 64}))
    for message_type in ("train", "evaluate"):
        reply = app(message=_incoming(cfg, message_type), context=context)
        status = reply.content[protocol.SITE]
        assert status[protocol.STATUS] == protocol.STATUS_REFUSED
        assert running_app_hash() in status[protocol.REASON]
        assert "not approved" in status[protocol.REASON]
        assert protocol.ARRAYS not in reply.content
    assert [e["kind"] for e in read_log(tmp_path / EGRESS_LOG)] == ["refusal", "refusal"]


def test_a_deployed_sites_log_line_is_on_disk_before_the_reply_leaves_a_simulated_one_skips_it(
        cfg, site_folder, tmp_path, monkeypatch):
    """fsync per reply for a deployed site (the log survives a crash right after sending); a
    simulated site (synthetic data, the coordinator's machine) skips it: ~5 ms a reply, six
    replies per site per round under secure aggregation."""
    synced = []
    monkeypatch.setattr(egress.os, "fsync", lambda fd: synced.append(fd))
    app = build_client_app()
    deployed = _context(_deployed(site_folder, tmp_path / "d", **{
        "approved-app-hashes": running_app_hash()}))
    app(message=_incoming(cfg, "evaluate"), context=deployed)
    assert len(synced) == 1 and len(read_log(tmp_path / "d" / EGRESS_LOG)) == 1
    simulated = SiteSettings(site_id="hospital_x", data_path=site_folder,
                             state_dir=tmp_path / "s", simulated=True)
    egress.send(_incoming(cfg, "evaluate"), RecordDict(), kind="metrics", site=simulated,
                context=deployed)
    assert len(synced) == 1 and len(read_log(tmp_path / "s" / EGRESS_LOG)) == 1


def test_a_run_for_another_task_is_refused(cfg, site_folder, tmp_path):
    app = build_client_app()
    context = _context(_deployed(site_folder, tmp_path, task="vitals",
                                 **{"require-approval": "false"}))
    reply = app(message=_incoming(cfg, "train"), context=context)
    assert reply.content[protocol.SITE][protocol.REASON] == (
        "this site's data is for task 'vitals'; the run asks for task 'tabular'")


def test_a_declined_dp_round_sends_only_the_ledger_with_the_sites_own_delta(
        cfg, site_folder, tmp_path):
    app = build_client_app()
    context = _context(_deployed(site_folder, tmp_path, **{
        "require-approval": False, "max-epsilon": 0.01, "delta": 1e-7}))
    reply = app(message=_incoming(cfg, "train", privacy=True), context=context)
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_DECLINED
    assert reply.content[protocol.PRIVACY]["delta"] == 1e-7  # the site's δ, not the server's
    (entry,) = read_log(tmp_path / EGRESS_LOG)
    assert entry["kind"] == "privacy-ledger" and "arrays" not in entry["records"]


def test_a_failing_handler_replies_with_a_logged_error(cfg, tmp_path):
    app = build_client_app()
    context = _context(_deployed(tmp_path / "no-such-folder", tmp_path,
                                 **{"require-approval": False}))
    reply = app(message=_incoming(cfg, "train"), context=context)
    # only the error's class and code leave (tests/test_site_policy.py: no values, no paths)
    assert reply.has_error() and "no-such-folder" not in reply.error.reason
    assert "[site error " in reply.error.reason
    (entry,) = read_log(tmp_path / EGRESS_LOG)
    assert entry["kind"] == "error" and entry["reason"] == reply.error.reason
    assert entry["bytes"] == len(reply.error.reason.encode())


def test_the_simulation_skips_approval_explicitly_and_still_logs(cfg, site_folder, tmp_path):
    app = build_client_app({0: {"site-id": "sim_0", "data-path": str(site_folder),
                                "state-dir": str(tmp_path), "threads": 1}})
    reply = app(message=_incoming(cfg, "evaluate"), context=_context({"partition-id": 0}))
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    assert [e["kind"] for e in read_log(tmp_path / EGRESS_LOG)] == ["metrics"]


def test_an_unknown_kind_never_leaves(cfg, tmp_path):
    site = SiteSettings(site_id="h", data_path=tmp_path, state_dir=tmp_path)
    with pytest.raises(ValueError, match="egress kind 'gradients' is not one of"):
        egress.send(_incoming(cfg, "train"), RecordDict(), kind="gradients", site=site,
                    context=_context({}))
    assert not (tmp_path / EGRESS_LOG).exists()


def _line(run_id, rnd, kind, size):
    return json.dumps({"time": f"2026-11-22T10:00:0{rnd}.000+00:00", "site": "h",
                       "run_id": run_id, "round": rnd, "message_type": "train", "kind": kind,
                       "bytes": size, "sha256": "0" * 64, "records": {}})


def test_the_summary_for_a_privacy_officer(tmp_path):
    log = tmp_path / EGRESS_LOG
    log.write_text("\n".join([_line(1, 1, "update", 1000), _line(1, 1, "metrics", 50),
                              _line(1, 2, "update", 1000), _line(2, 1, "refusal", 600)]) + "\n")
    summary = summarize(read_log(log))
    assert summary["messages"] == 4 and summary["bytes"] == 2650
    assert summary["runs"][1]["kinds"] == {"update": 2, "metrics": 1}
    assert summary["runs"][1]["bytes_by_kind"] == {"update": 2000, "metrics": 50}
    assert summary["runs"][1]["rounds"] == [1, 2] and summary["runs"][2]["rounds"] == [1]
    proc = subprocess.run([sys.executable, "-m", "client.egress", "summarize", str(log)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "4 message(s), 2,650 bytes left this site in 2 run(s)" in proc.stdout
    assert "update" in proc.stdout and "model weights after local training" in proc.stdout


def test_a_damaged_log_is_named_with_its_line(tmp_path):
    log = tmp_path / EGRESS_LOG
    log.write_text(_line(1, 1, "update", 10) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{EGRESS_LOG}, line 2: not a JSON object"):
        read_log(log)
    proc = subprocess.run([sys.executable, "-m", "client.egress", "summarize",
                           str(Path(tmp_path) / "missing.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_each_logged_update_says_whether_it_was_dp_noised_and_whether_masked(
        cfg, site_folder, tmp_path):
    app = build_client_app()
    for folder, privacy in ((tmp_path / "dp", True), (tmp_path / "plain", False)):
        context = _context(_deployed(site_folder, folder, **{"require-approval": False}))
        train = app(message=_incoming(cfg, "train", privacy=privacy), context=context)
        app(message=_incoming(cfg, "evaluate", privacy=privacy), context=context)
        update, metrics = read_log(folder / EGRESS_LOG)
        assert update["kind"] == "update" and update["model_update"] is True
        assert update["masked"] is False
        assert update["dp_sgd"] is privacy
        assert update["noise_multiplier"] == (
            train.content[protocol.PRIVACY]["noise_multiplier"] if privacy else None)
        assert privacy is False or update["noise_multiplier"] > 0
        # an evaluation reply carries no model: nothing to noise or mask
        assert (metrics["model_update"], metrics["dp_sgd"], metrics["masked"]) == (
            False, False, False)


def test_a_masked_upload_is_logged_as_masked():
    import numpy as np
    from flwr.app import Array

    masked = RecordDict({protocol.ARRAYS: ArrayRecord(
        {protocol.MASKED_UPDATE: Array(np.zeros(8, dtype=np.uint32))})})
    assert egress.protection(masked) == {"model_update": True, "dp_sgd": False,
                                         "noise_multiplier": None, "masked": True}
    ledger = protocol.encode_ledger({"accountant": "rdp", "delta": 1e-5, "epsilon": 1.0,
                                     "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 10,
                                     "rounds_trained": 1, "rounds_declined": 0,
                                     "epsilon_per_round": [1.0]})
    masked[protocol.PRIVACY] = ledger
    assert egress.protection(masked) == {"model_update": True, "dp_sgd": True,
                                         "noise_multiplier": 0.9, "masked": True}
    # a ledger that records no noise, or no DP-SGD step, does not make an update DP-noised
    for key, value in (("noise_multiplier", 0.0), ("steps", 0)):
        masked[protocol.PRIVACY] = ConfigRecord({**ledger, key: value})
        assert egress.protection(masked)["dp_sgd"] is False
    # a ledger alone (a declined round) protects no model: there is none
    assert egress.protection(RecordDict({protocol.PRIVACY: ledger}))["model_update"] is False


def test_the_summary_lists_each_update_with_its_protection(tmp_path):
    def line(rnd, kind, **protection):
        entry = json.loads(_line(7, rnd, kind, 100))
        return json.dumps({**entry, "sha256": f"{rnd}" * 64, **protection})

    log = tmp_path / EGRESS_LOG
    log.write_text("\n".join([
        line(1, "update", model_update=True, dp_sgd=True, noise_multiplier=1.25, masked=False),
        line(1, "metrics", model_update=False, dp_sgd=False, noise_multiplier=None,
             masked=False),
        line(2, "masked-update", model_update=True, dp_sgd=True, noise_multiplier=1.25,
             masked=True),
        _line(7, 3, "update", 100),  # a line written before protection was logged
    ]) + "\n")
    summary = summarize(read_log(log))
    assert [(u["round"], u["dp_sgd"], u["masked"]) for u in summary["runs"][7]["updates"]] == [
        (1, True, False), (2, True, True), (3, None, False)]
    text = egress.render_summary(summary, str(log))
    assert ("model updates: 3; DP-SGD noised: 2 of 3; masked by secure aggregation: 1 of 3; "
            "1 from before protection was logged") in text
    assert ("round 1 train: DP-SGD noised (σ 1.25), not masked (the server sees this update "
            "on its own); sha256 1111111111111111…") in text
    assert "round 2 train: DP-SGD noised (σ 1.25), masked by secure aggregation" in text
    assert "round 3 train: DP noise not recorded (older log line), not masked" in text
