"""Reliability: updates are validated before aggregation, robust strategies survive a hostile
site, and a crashed run resumes from its checkpoint without losing or repeating a round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from client.evaluation import evaluate
from client.tasks import get_task
from client.training import LocalTrainingConfig, train_local
from models import build_model
from privacy import protocol
from server.checkpoint import CheckpointError, load_checkpoint, resumable_config
from server.history import RunHistory
from server.settings import compose
from server.strategy import build_strategy
from server.validation import UpdateBounds, check_update
from simulations.sites import site_folders
from tests.helpers import ROOT, run_simulation_cli


def _reply(site: str, arrays: ArrayRecord, num_examples: float = 100) -> Message:
    content = RecordDict({
        protocol.ARRAYS: arrays,
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: num_examples}),
        protocol.SITE: ConfigRecord({protocol.SITE_ID: site, protocol.STATUS: protocol.STATUS_OK}),
    })
    metadata = Metadata(run_id=1, message_id=site, src_node_id=abs(hash(site)) % 1000,
                        dst_node_id=0, reply_to_message_id="", group_id="1", created_at=0.0,
                        ttl=60.0, message_type="train")
    return Message(content=content, metadata=metadata)


def _arrays(**values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


GLOBAL = _arrays(w=np.zeros((3, 2), np.float32), b=np.zeros(2, np.float32))


@pytest.mark.parametrize(
    "arrays,count,expected",
    [
        (_arrays(w=np.ones((3, 2), np.float32)), 10, "model keys differ"),
        (_arrays(w=np.ones((2, 3), np.float32), b=np.ones(2, np.float32)), 10, "has shape (2, 3)"),
        (_arrays(w=np.ones((3, 2), np.float64), b=np.ones(2, np.float32)), 10, "dtype float64"),
        (_arrays(w=np.full((3, 2), np.nan, np.float32), b=np.ones(2, np.float32)), 10, "NaN"),
        (_arrays(w=np.full((3, 2), 1e3, np.float32), b=np.ones(2, np.float32)), 10,
         "exceeds validation.max_update_norm"),
        (_arrays(w=np.ones((3, 2), np.float32), b=np.ones(2, np.float32)), -5, "outside [1,"),
        (_arrays(w=np.ones((3, 2), np.float32), b=np.ones(2, np.float32)), 2.5, "whole number"),
        (_arrays(w=np.ones((3, 2), np.float32), b=np.ones(2, np.float32)), 1e12, "outside [1,"),
    ],
)
def test_a_bad_update_is_rejected_with_a_reason(arrays, count, expected):
    reason, _ = check_update(_reply("h1", arrays, count), GLOBAL, UpdateBounds(100.0, 10**7))
    assert reason is not None and expected in reason


def test_a_good_update_passes_and_its_norm_is_measured():
    arrays = _arrays(w=np.ones((3, 2), np.float32), b=np.ones(2, np.float32))
    reason, norm = check_update(_reply("h1", arrays), GLOBAL, UpdateBounds())
    assert reason is None and norm == pytest.approx(np.sqrt(8))


def test_rejected_sites_are_named_and_the_round_goes_on():
    strategy = build_strategy({"name": "fedavg"}, 3)
    strategy.last_arrays = GLOBAL
    good = _arrays(w=np.ones((3, 2), np.float32), b=np.ones(2, np.float32))
    bad = _arrays(w=np.full((3, 2), np.inf, np.float32), b=np.ones(2, np.float32))
    screening = strategy.screen_train([_reply("h3", good), _reply("h2", bad),
                                       _reply("h1", good)])
    arrays = strategy.aggregate_updates(1, screening.accepted)
    assert np.allclose(arrays["w"].numpy(), 1.0)  # the Inf never reached the average
    assert set(screening.trained) == {"h1", "h3"} and "NaN or Inf" in screening.rejected["h2"]
    # Flower aggregates in site order, whatever order the replies arrived in
    assert [m.content[protocol.SITE][protocol.SITE_ID] for m in screening.accepted] == ["h1", "h3"]
    assert set(screening.update_norms) == {"h1", "h3"}  # an Inf update has no norm


# --- robust aggregation: one hostile site among five --------------------------------------

@pytest.fixture(scope="module")
def honest_updates():
    """Five tabular sites trained one round from the same global model (real local training)."""
    cfg = compose(["task=tabular", "num_hospitals=5"])
    task = get_task("tabular")
    folders = site_folders(cfg)
    data = [task.load_site(f, cfg["task"], s) for s, f in folders.items()]
    torch.manual_seed(0)
    spec = task.input_spec(cfg["task"])
    start = build_model(cfg["model"], spec).state_dict()
    updates = []
    for i, site in enumerate(data):
        model = build_model(cfg["model"], spec)
        model.load_state_dict(start)
        train_local(model, site.train, LocalTrainingConfig(epochs=5, batch_size=32, lr=0.01,
                                                           optimizer="adam"), seed=i)
        updates.append(ArrayRecord(model.state_dict()))
    test = torch.utils.data.ConcatDataset([d.test for d in data])
    return cfg, spec, ArrayRecord(start), updates, test, data[0].num_classes


def _copy(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(a.numpy().copy()) for k, a in arrays.items()})


def _accuracy(cfg, spec, arrays, test, num_classes):
    model = build_model(cfg["model"], spec)
    model.load_state_dict(arrays.to_torch_state_dict())
    return evaluate(model, test, num_classes)["accuracy"]


def test_fedavg_is_destroyed_by_a_hostile_site_and_robust_strategies_are_not(honest_updates):
    cfg, spec, start, updates, test, num_classes = honest_updates
    start_np = {k: a.numpy() for k, a in start.items()}
    # site 5 sends the sign-flipped update, scaled 20x (within the norm bound: only a robust
    # aggregator can stop it)
    hostile = ArrayRecord({k: Array(start_np[k] - 20 * (a.numpy() - start_np[k]))
                           for k, a in updates[4].items()})
    sent = {"honest": updates, "attacked": updates[:4] + [hostile]}
    accuracy = {}
    for name, extra in [("fedavg", {}), ("fedmedian", {}), ("trimmedavg", {"beta": 0.2}),
                        ("krum", {"num_malicious_nodes": 1})]:
        for label, arrays_sent in sent.items():
            # fresh messages each time: Flower's FedMedian pops the arrays it aggregates
            batch = [_reply(f"h{i}", _copy(u)) for i, u in enumerate(arrays_sent)]
            strategy = build_strategy({"name": name, **extra}, 5,
                                      bounds=UpdateBounds(max_update_norm=None))
            strategy.last_arrays = start
            arrays = strategy.aggregate_updates(1, strategy.screen_train(batch).accepted)
            accuracy[name, label] = _accuracy(cfg, spec, arrays, test, num_classes)
    assert accuracy["fedavg", "honest"] > 0.7
    assert accuracy["fedavg", "attacked"] < accuracy["fedavg", "honest"] - 0.15, accuracy
    for name in ("fedmedian", "trimmedavg", "krum"):
        assert accuracy[name, "attacked"] > accuracy["fedavg", "honest"] - 0.05, (name, accuracy)


# --- checkpoint and resume ------------------------------------------------------------------

RUN = ("task=tabular", "num_hospitals=3", "strategy=fedadam", "privacy=dp",
       "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "local_epochs=1",
       "baselines=none")


def _summary(report):
    return ([r["round"] for r in report["rounds"]], report["final"]["global"],
            {s: (led["epsilon"], led["steps"], led["rounds_trained"])
             for s, led in report["privacy"].items()})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    report = run_simulation_cli(out, *RUN, "rounds=3")
    report["out"] = str(out)
    return report


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    run_simulation_cli(tmp_path / "part", *RUN, "rounds=2")
    assert load_checkpoint(tmp_path / "part").round == 2
    resumed = run_simulation_cli(tmp_path / "part", *RUN, "rounds=3",
                                 f"resume={tmp_path / 'part'}")
    assert _summary(resumed) == _summary(uninterrupted)
    # the sites' ledgers continued from disk: epsilon after round 3 covers all three rounds
    for led in resumed["privacy"].values():
        assert len(led["epsilon_per_round"]) == 3


@pytest.mark.slow
def test_a_server_killed_mid_run_resumes_without_losing_or_repeating_a_round(
    uninterrupted, tmp_path
):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={out}", *RUN, "rounds=3"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its Ray workers, no clean-up
        proc.wait()
    assert not (out / "report.json").exists()
    done = load_checkpoint(out).round
    assert 1 <= done < 3
    resumed = run_simulation_cli(out, *RUN, "rounds=3", f"resume={out}")
    rounds, final, ledgers = _summary(resumed)
    assert rounds == [1, 2, 3]  # none lost, none repeated
    assert final == _summary(uninterrupted)[1]
    for site, (epsilon, steps, trained) in ledgers.items():
        full_eps, full_steps, _ = _summary(uninterrupted)[2][site]
        # a site that trained in the round the server lost counted it (its update did leave
        # the site): its epsilon can only be higher than the uninterrupted run's, never lower
        assert epsilon >= full_eps - 1e-9 and steps >= full_steps and trained >= 3


@pytest.mark.slow
def test_resume_refuses_a_different_run_or_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.npz"):
        load_checkpoint(tmp_path)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={tmp_path / 'x'}",
         f"resume={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint.npz" in proc.stdout + proc.stderr
    # a checkpoint is data only: a pickled object inside is refused, never unpickled
    np.savez(tmp_path / "checkpoint.npz", __meta__=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable medsilo checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable medsilo checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_may_change_rounds_and_tracking_but_nothing_that_changes_the_run():
    saved = {"rounds": 3, "lr": 0.1, "tracking": {"name": "off"}}
    resumed = resumable_config(saved, {"rounds": 5, "lr": 0.1,
                                       "tracking": {"name": "mlflow", "uri": "x.db"}})
    assert resumed["rounds"] == 5
    # a checkpoint saved before the tracking group existed still resumes
    assert resumable_config({"rounds": 3, "lr": 0.1}, {"rounds": 3, "lr": 0.1,
                                                       "tracking": {"name": "off"}})
    with pytest.raises(CheckpointError, match=r"\['lr'\]"):
        resumable_config(saved, {"rounds": 3, "lr": 0.2, "tracking": {"name": "off"}})


@pytest.mark.slow
def test_the_checkpoint_holds_the_last_round_and_no_temporary_file_is_left(uninterrupted):
    out = Path(uninterrupted["out"])
    checkpoint = load_checkpoint(out)
    assert checkpoint.round == 3
    assert set(checkpoint.strategy_state) and all(
        k.split("/")[0] in ("m_t", "v_t") for k in checkpoint.strategy_state)  # FedAdam moments
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []
    for r in uninterrupted["rounds"]:
        assert r["skipped"] is None and r["rejected"] == {}, r


# --- stragglers: a site that does not answer in time ---------------------------------------

class _GridWithAStraggler:
    """Three sites; node 3 misses the round-1 deadline (its reply never arrives in time)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            server_round = int(msg.content["config"]["server-round"])
            self.sent.append((server_round, kind))
            if node == 3 and server_round == 1:
                continue  # the straggler: still training when the timeout expires
            site = f"hospital_{node}"
            status = ConfigRecord({protocol.SITE_ID: site, protocol.STATUS: protocol.STATUS_OK})
            if kind == "train":
                arrays = ArrayRecord({k: Array(a.numpy() + 0.1)
                                      for k, a in msg.content[protocol.ARRAYS].items()})
                content = RecordDict({protocol.ARRAYS: arrays, protocol.SITE: status,
                                      protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10})})
            else:
                content = RecordDict({protocol.SITE: status, protocol.METRICS: MetricRecord(
                    {protocol.NUM_EXAMPLES: 10, "loss": 0.5})})
            reply = Message(content=content, reply_to=msg)  # from msg.dst_node_id
            replies.append(reply)
        return replies


@pytest.mark.parametrize("min_sites,expect_skip", [(2, False), (3, True)])
def test_a_late_site_is_left_out_and_named_and_too_few_answers_skip_the_round(
    monkeypatch, min_sites, expect_skip
):
    from flwr.supercore.task_identity import TaskIdentity

    from server.rounds import run_rounds

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what the ServerApp process sets
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    history = RunHistory()
    strategy = build_strategy({"name": "fedavg"}, 3)
    finished = []  # what on_round saw: the round's record, complete
    outcome = run_rounds(strategy, _GridWithAStraggler(), history, GLOBAL, first_round=1,
                         num_rounds=2, timeout=1.0, train_config=ConfigRecord(),
                         evaluate_config=ConfigRecord(), min_sites=min_sites,
                         on_round=lambda r: finished.append(
                             (r.round, r.global_metrics, r.duration_s is not None)))
    first, second = history.round(1), history.round(2)
    # no server-side evaluation: the sites' weighted mean stands for the global metrics
    assert finished == [(1, pytest.approx({"loss": 0.5}), True),
                        (2, pytest.approx({"loss": 0.5}), True)]
    assert first.timed_out == ["node 3"]  # never answered before: known by its node id
    assert sorted(first.train) == ["hospital_1", "hospital_2"]
    assert (first.skipped_round is not None) == expect_skip
    if expect_skip:
        assert "fewer than min_sites=3" in first.skipped_round
    assert outcome.stopped is None and second.timed_out == []  # the run went on
    assert sorted(second.train) == ["hospital_1", "hospital_2", "hospital_3"]
    expected = 0.1 if expect_skip else 0.2  # a skipped round leaves the global model unchanged
    assert np.allclose(outcome.arrays["w"].numpy(), expected)
