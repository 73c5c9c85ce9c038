"""Attacks of a dishonest server on a site's policy: each must fail at the site.

The server builds the messages (run settings, privacy settings) as it likes; the site's own
settings (client/site.py) and its policy (client/policy.py) decide.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import build_client_app
from client.egress import EGRESS_LOG, read_log
from client.privacy_budget import LEDGER_FILE, plan_ledger
from client.tasks import get_task
from privacy import protocol
from privacy.accounting import PrivacyLedger
from server.app import initial_model
from server.settings import compose, site_settings

RUN_ID = 7


@pytest.fixture(scope="module")
def cfg():
    return compose(["task=tabular", "task.synthetic.train_size=40",
                    "task.synthetic.test_size=16", "local_epochs=1", "privacy=dp",
                    "privacy.accountant=rdp", "model.hidden=[8]"])


@pytest.fixture(scope="module")
def site_folder(cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("site") / "hospital_x"
    task = get_task("tabular")
    task.generate_site(folder, cfg["task"], task.site_profiles(cfg["task"], 1, 0)[0], 0)
    return folder


def _message(cfg, message_type: str = "train", **privacy) -> Message:
    """What a (dishonest) server sends: the run settings with ``privacy`` overridden."""
    settings = site_settings(cfg)
    settings["privacy"] = {**settings["privacy"], **privacy}
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(initial_model(cfg).state_dict()),
        protocol.CONFIG: ConfigRecord({**protocol.encode_run_settings(settings),
                                       protocol.SERVER_ROUND: 1}),
    })
    metadata = Metadata(run_id=RUN_ID, message_id=f"m-{message_type}", src_node_id=1,
                        dst_node_id=7, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(metadata=metadata, content=content)


def _send(cfg, node_config, message_type="train", **privacy) -> Message:
    context = Context(run_id=RUN_ID, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    return build_client_app()(message=_message(cfg, message_type, **privacy), context=context)


def _site(folder, state, **extra):
    return {"site-id": "hospital_x", "data-path": str(folder), "state-dir": str(state),
            "threads": 1, "require-approval": False, **extra}


def _refusal(reply: Message) -> str:
    status = reply.content[protocol.SITE]
    assert status[protocol.STATUS] == protocol.STATUS_REFUSED, dict(status)
    assert protocol.ARRAYS not in reply.content  # nothing of the model left
    return str(status[protocol.REASON])


def test_privacy_off_is_refused_by_a_site_that_requires_dp(cfg, site_folder, tmp_path):
    # deployment default (no require_dp line): DP required; with a budget too
    for extra in ({}, {"max-epsilon": 8.0}, {"require-dp": True}):
        state = tmp_path / str(len(extra))
        for kind in ("train", "evaluate"):
            reason = _refusal(_send(cfg, _site(site_folder, state, **extra), kind, name="off"))
            assert "requires DP-SGD" in reason and "privacy=off" in reason
        assert not (state / LEDGER_FILE).exists()  # nothing trained, nothing spent
    # a site that explicitly allows it trains without DP
    reply = _send(cfg, _site(site_folder, tmp_path / "ok", **{"require-dp": False}), name="off")
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK


def test_sigma_below_the_sites_floor_is_refused_and_a_planned_sigma_raised(
        cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path / "a", **{"min-noise-multiplier": 2.0})
    reason = _refusal(_send(cfg, site, noise_multiplier=0.3, target_epsilon=None))
    assert "noise multiplier 0.3" in reason and "min_noise_multiplier 2" in reason
    # a target epsilon that would plan sigma < 2: the site trains with sigma = 2 instead
    reply = _send(cfg, site, target_epsilon=50.0)
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    assert reply.content[protocol.PRIVACY]["noise_multiplier"] == 2.0
    ledger = PrivacyLedger.load(tmp_path / "a" / LEDGER_FILE)
    assert ledger.noise_multiplier == 2.0
    # a later round cannot lower it: sigma is fixed in the site's own ledger
    reply = _send(cfg, site, noise_multiplier=2.5, target_epsilon=None)
    assert PrivacyLedger.load(tmp_path / "a" / LEDGER_FILE).noise_multiplier == 2.0


def test_the_site_plans_sigma_from_its_own_budget(cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path, **{"max-epsilon": 2.0})
    reply = _send(cfg, site, target_epsilon=40.0)  # the server proposes a weak guarantee
    ledger = reply.content[protocol.PRIVACY]
    assert ledger["max_epsilon"] == 2.0 and ledger["epsilon"] <= 2.0
    plan = site_settings(cfg)["plan"]["rounds"]
    weak = plan_ledger({**site_settings(cfg)["privacy"], "target_epsilon": 40.0}, 40, 32, 1,
                       plan, None)
    assert ledger["noise_multiplier"] > 2 * weak.noise_multiplier


@pytest.mark.parametrize("privacy, expected", [
    ({"max_grad_norm": 50.0}, "max_grad_norm 50"),
    ({"name": "dp-ish"}, "unknown privacy mode"),
    ({"count_noise": 0.0}, "noisy count"),
    ({"accountant": "moments"}, "unknown accountant"),
    ({"delta": 0.5, "max_grad_norm": 1.0}, None),  # delta < 1 is the server's to propose
])
def test_run_settings_outside_the_sites_policy_are_refused(cfg, site_folder, tmp_path,
                                                            privacy, expected):
    site = _site(site_folder, tmp_path, **{"max-grad-norm-range": "0.1,10"})
    reply = _send(cfg, site, **privacy)
    if expected is None:
        assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    else:
        assert expected in _refusal(reply)


def test_models_and_tasks_the_site_does_not_allow_are_refused(cfg, site_folder, tmp_path):
    reason = _refusal(_send(cfg, _site(site_folder, tmp_path, **{"allowed-models": "logreg"})))
    assert "model 'mlp' is not among this site's allowed_models ['logreg']" in reason
    reason = _refusal(_send(cfg, _site(site_folder, tmp_path, **{"allowed-tasks": "vitals"})))
    assert "task 'tabular' is not among" in reason


def test_a_deployed_site_without_a_state_dir_fails_closed(cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path)
    del site["state-dir"]
    reason = _refusal(_send(cfg, site))
    assert "no state_dir" in reason
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root ignores permissions
        assert "not writable" in _refusal(_send(cfg, _site(site_folder, read_only)))


def test_the_ledger_and_the_egress_log_are_the_sites_alone(cfg, site_folder, tmp_path):
    reply = _send(cfg, _site(site_folder, tmp_path / "state"))
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    for name in (LEDGER_FILE, EGRESS_LOG):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_an_error_reply_carries_no_patient_value_and_no_path(cfg, tmp_path, caplog):
    folder = tmp_path / "hospital_y"
    folder.mkdir()
    # a malformed record: the loader's error quotes the value and the file's path
    good = get_task("tabular")
    good.generate_site(folder, cfg["task"], good.site_profiles(cfg["task"], 1, 0)[0], 0)
    (data,) = [p for p in folder.iterdir() if p.is_file()]
    lines = data.read_text().splitlines()
    fields = lines[0].split(",")
    fields[2] = "987654321"  # chest-pain type: not one of its declared codes
    data.write_text("\n".join([",".join(fields), *lines[1:]]) + "\n")
    with caplog.at_level(logging.ERROR, logger="flwr.medsilo.egress"):
        reply = _send(cfg, _site(folder, tmp_path / "state"))
    assert reply.has_error()
    reason = reply.error.reason
    assert "987654321" not in reason and str(tmp_path) not in reason and "/" not in reason
    assert "[site error " in reason and reason.split(" ")[0].isidentifier()
    (entry,) = read_log(tmp_path / "state" / EGRESS_LOG)
    assert entry["kind"] == "error" and entry["reason"] == reason
    # the site's own log keeps the full text under the same code
    code = reason.split("[site error ")[1][:8]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert code in logged
    assert any("987654321" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_only_a_noisy_count_of_the_site_leaves_and_it_is_charged(cfg):
    privacy = {**site_settings(cfg)["privacy"], "count_noise": 10.0}
    # two sites that differ in one patient and draw the same noise release the same numbers
    # whenever their noisy counts round alike; everything sent derives from that count
    a = plan_ledger(privacy, 400, 32, 1, 3, None, count_draw=0.3)
    b = plan_ledger(privacy, 401, 32, 1, 3, None, count_draw=0.2)
    assert a.released_count == b.released_count == 403
    assert (a.noise_multiplier, a.sample_rate) == (b.noise_multiplier, b.sample_rate)
    # ñ is charged when it first leaves (the first trained round) as the ledger's first
    # mechanism: (count_noise, q=1, one step), composed with DP-SGD by the accountant; the
    # planned total stays within the target
    assert a.history == [] and a.epsilon() == 0.0 and a.report()["sample_rate"] is None
    a.record_round(13 * 3)
    assert a.history == [(10.0, 1.0, 1), (a.noise_multiplier, a.sample_rate, 39)]
    assert a.steps == 39 and a.report()["sample_rate"] == a.sample_rate
    assert a.epsilon() <= privacy["target_epsilon"]
    alone = PrivacyLedger(accountant="rdp", delta=a.delta, noise_multiplier=a.noise_multiplier,
                          sample_rate=a.sample_rate)
    alone.record_round(13 * 3)
    assert a.epsilon() > alone.epsilon()  # the count is charged, not free
    again = PrivacyLedger.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.released_count == 403 and again.epsilon() == a.epsilon()
