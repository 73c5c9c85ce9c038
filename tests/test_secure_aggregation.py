"""secagg=on: the server learns only the weighted mean of the sites' updates, and that mean is
the plaintext one up to a quantization error we bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.egress import EGRESS_LOG, read_log
from privacy import protocol
from privacy.secagg import setup
from privacy.secagg.loopback import run_round
from privacy.secagg.update import decode_mean, encode_update, mean_error_bound, site_weight
from server.history import RunHistory
from server.rounds import run_rounds
from server.secure_aggregation import (
    SecureAggregate,
    SecureRound,
    SecureRoundRecord,
    masked_vector,
)
from server.settings import ConfigError, compose
from server.strategy import build_strategy
from tests.helpers import run_simulation_cli

SHAPES = [(16, 8), (8,), (3, 8)]


def _deltas(rng, scale):
    return [rng.normal(0, scale, s).astype(np.float32) for s in SHAPES]


@pytest.mark.parametrize("dropped", [[], [2]])
def test_the_secure_mean_equals_the_plaintext_weighted_mean_within_the_bound(dropped):
    rng = np.random.default_rng(0)
    counts = [120, 480, 300, 75, 1000]
    deltas = [_deltas(rng, 0.05) for _ in counts]
    deltas[1][0][0, 0] = 3.0  # beyond the clip: clipped at the site, counted
    clip, cap, n = 0.5, 10_000, len(counts)
    vectors, clipped = {}, {}
    for i, (delta, count) in enumerate(zip(deltas, counts)):
        vectors[i], clipped[i] = encode_update(delta, site_weight(count, cap), clip=clip,
                                               num_sites=n, rng=i)
    assert clipped[1] > 0 and clipped[0] == 0
    result = run_round(setup(n, seed=0), vectors, dropouts={"masked-input": dropped})
    survivors = sorted(result.survivors)
    assert survivors == [i for i in range(n) if i not in dropped]
    mean, weight_sum = decode_mean(result.total, SHAPES, clip=clip, num_sites=n,
                                   num_summed=len(survivors))
    weights = np.array([counts[i] / cap for i in survivors])
    assert weight_sum == pytest.approx(weights.sum(), abs=1e-6)
    bound = mean_error_bound(clip=clip, num_sites=n, num_summed=len(survivors),
                             weight_sum=weight_sum)
    assert 0 < bound < 1e-6
    for k in range(len(SHAPES)):
        exact = sum(w * np.clip(deltas[i][k].astype(np.float64), -clip, clip)
                    for w, i in zip(weights, survivors)) / weights.sum()
        assert np.max(np.abs(mean[k] - exact)) <= bound


def test_the_upload_is_one_uint32_per_coordinate():
    delta = _deltas(np.random.default_rng(1), 0.1)
    vector, _ = encode_update(delta, 0.5, clip=0.5, num_sites=4, rng=0)
    assert vector.dtype == np.uint32
    assert vector.nbytes == sum(d.nbytes for d in delta) + 4  # fp32 size + the weight


def test_a_nan_update_is_never_encoded():
    delta = _deltas(np.random.default_rng(2), 0.1)
    delta[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_update(delta, 0.5, clip=0.5, num_sites=4, rng=0)


def test_secagg_config_is_checked():
    cfg = compose(["secagg=on"])
    assert cfg["secagg"]["name"] == "on" and cfg["secagg"]["clip"] > 0
    with pytest.raises(ConfigError, match="robust strategies"):
        compose(["secagg=on", "strategy=fedmedian"])
    with pytest.raises(ConfigError, match="secagg.threshold"):
        compose(["secagg=on", "secagg.threshold=1"])
    with pytest.raises(ConfigError, match="secagg.clip"):
        compose(["secagg=on", "secagg.clip=0"])


# --- end to end: Flower rounds over the Grid, DP composed, a dropout recovered --------------

# The budget below and the byte bounds are calibrated on these training settings (the plain
# defaults), not on the tuned DP defaults of conf/training/mlp_dp.yaml.
E2E = ("task=tabular", "num_hospitals=3", "rounds=2", "local_epochs=1", "privacy=dp",
       "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "batch_size=32",
       "optimizer=adam", "lr=0.003", "model.hidden=[32,16]", "model.dropout=0.1",
       "model.activation=relu")


@pytest.fixture(scope="module")
def budget():
    """A budget between what the sites spend in one round and in two, so that the site with
    the largest per-round epsilon declines round 2 (a dropout after sharing keys)."""
    return "privacy.max_epsilon=4.0"  # one round: 2.6-3.4; two: 3.3, 3.6, 4.3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, budget):
    plain_dir = tmp_path_factory.mktemp("plain")
    secure_dir = tmp_path_factory.mktemp("secure")
    plain = run_simulation_cli(plain_dir, *E2E, budget)
    secure = run_simulation_cli(secure_dir, *E2E, budget, "secagg=on")
    return plain_dir, plain, secure_dir, secure


@pytest.mark.slow
def test_secure_rounds_give_the_plaintext_model_up_to_quantization(runs):
    plain_dir, plain, secure_dir, secure = runs
    assert secure["run"]["secure_aggregation"] is True
    a = torch.load(plain_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(secure_dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # DP noise is seeded: same updates, summed securely
    for r_plain, r_secure in zip(plain["rounds"], secure["rounds"]):
        assert r_plain["declined"].keys() == r_secure["declined"].keys()


@pytest.mark.slow
def test_a_site_that_declines_after_sharing_keys_is_recovered(runs):
    _, _, _, secure = runs
    first, second = (r["secure_aggregation"] for r in secure["rounds"])
    assert len(first["aggregated"]) == 3 and first["dropped"] == [] and not first["aborted"]
    declined = sorted(secure["rounds"][1]["declined"])
    assert declined, "the budget should make one site decline round 2"
    assert second["dropped"] == declined and len(second["aggregated"]) == 3 - len(declined)
    assert not second["aborted"]


@pytest.mark.slow
def test_the_report_states_bytes_uploaded_per_site(runs):
    _, _, _, secure = runs
    record = secure["rounds"][0]["secure_aggregation"]
    plaintext = record["plaintext_update_bytes"]
    for site, sent in record["upload_bytes"].items():
        # all five stage replies of a site: at most the fp32 model plus a fixed overhead
        assert plaintext < sent < plaintext + 8_000, (site, sent, plaintext)
    # no site sent its example count or weights in the clear
    for metrics in secure["rounds"][0]["train"].values():
        assert metrics["num_examples"] == 0
    # where the round's time went, stage by stage, within the round's duration
    stages = record["stage_s"]
    assert list(stages) == ["advertise_keys", "share_keys", "masked_input", "consistency",
                            "unmask", "decode"]
    assert all(s > 0 for s in stages.values())
    assert sum(stages.values()) < secure["rounds"][0]["duration_s"]


@pytest.mark.slow
def test_under_secagg_no_plain_update_leaves_a_site_and_both_sides_count_the_same_bytes(runs):
    _, _, secure_dir, secure = runs
    for site_dir in sorted((secure_dir / "sites").iterdir()):
        entries = read_log(site_dir / EGRESS_LOG)
        stages = [e for e in entries if e["message_type"].startswith("train.secagg_")]
        kinds = {e["kind"] for e in entries}
        assert "update" not in kinds and "masked-update" in kinds, kinds
        assert {e["message_type"] for e in entries} <= {
            "evaluate", *(f"train.{a}" for a in (protocol.SECAGG_ADVERTISE_KEYS,
                                                 protocol.SECAGG_SHARE_KEYS,
                                                 protocol.SECAGG_MASKED_INPUT,
                                                 protocol.SECAGG_CONSISTENCY,
                                                 protocol.SECAGG_UNMASK))}
        # what the server reports a site uploaded is what the site logged as sent
        reported = sum(r["secure_aggregation"]["upload_bytes"].get(site_dir.name, 0)
                       for r in secure["rounds"])
        assert reported == sum(e["bytes"] for e in stages) > 0


# --- the secure mean in the round loop (the stages' outcome given; no Ray) --------------------

class _EvaluatingGrid:
    """Three sites that answer the evaluation message; training goes through the stand-in."""

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(RecordDict({
            protocol.SITE: ConfigRecord({protocol.SITE_ID: f"hospital_{m.metadata.dst_node_id}"}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, "loss": 0.5})}),
            reply_to=m) for m in messages]


class _SecureStandIn:
    """Stands in for server.secure_aggregation.SecureAggregation: every site survives and the
    unmasked mean delta is ``delta``; the sites' replies carry status and loss only."""

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def exchange(self, grid, messages, timeout):
        global_arrays = messages[0].content[protocol.ARRAYS]
        sites = {m.metadata.dst_node_id: f"hospital_{m.metadata.dst_node_id}" for m in messages}
        replies = [Message(RecordDict({
            protocol.SITE: ConfigRecord({protocol.SITE_ID: sites[m.metadata.dst_node_id]}),
            protocol.METRICS: MetricRecord({"train_loss": 0.5, protocol.NUM_EXAMPLES: 0})}),
            reply_to=m) for m in messages]
        arrays = ArrayRecord({k: Array(a.numpy() + np.float32(self.delta))
                              for k, a in global_arrays.items()})
        return SecureRound(record=SecureRoundRecord(aggregated=sorted(sites.values())),
                           replies=replies, node_sites=sites,
                           aggregate=SecureAggregate(arrays, total_weight=30))


GLOBAL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _one_secure_round(monkeypatch, strategy_name: str, delta: float):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what the ServerApp process sets
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    history = RunHistory()
    outcome = run_rounds(
        build_strategy({"name": strategy_name}, 3), _EvaluatingGrid(), history,
        ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), first_round=1, num_rounds=1,
        timeout=1.0, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
        secure_aggregation=_SecureStandIn(delta))
    return outcome, history.round(1)


def test_fedavg_takes_the_secure_mean_as_the_new_global_model(monkeypatch):
    outcome, record = _one_secure_round(monkeypatch, "fedavg", 0.25)
    for key, start in GLOBAL.items():
        assert np.array_equal(outcome.arrays[key].numpy(), start + np.float32(0.25))
    assert sorted(record.train) == ["hospital_1", "hospital_2", "hospital_3"]
    assert record.update_norms == {} and record.rejected == {}  # no site's update was seen
    assert record.secure_aggregation["update_norm"] == pytest.approx(0.25 * np.sqrt(8))
    assert record.secure_aggregation["rejected"] is None and record.skipped_round is None


def test_fedadam_takes_its_server_side_step_from_the_secure_mean(monkeypatch):
    from flwr.serverapp.strategy import FedAdam

    outcome, _ = _one_secure_round(monkeypatch, "fedadam", 0.25)
    # Flower's own FedAdam, given the secure mean as the round's one update
    reference = FedAdam()
    reference.current_arrays = dict(GLOBAL)
    mean = RecordDict({
        protocol.ARRAYS: ArrayRecord({k: Array(v + np.float32(0.25)) for k, v in GLOBAL.items()}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 30})})
    expected, _ = reference.aggregate_train(1, [Message(mean, dst_node_id=0,
                                                        message_type="train")])
    for key in GLOBAL:
        step = outcome.arrays[key].numpy()
        assert step.dtype == np.float32  # the model's own dtype
        assert np.array_equal(step, expected[key].numpy().astype(np.float32))
        assert not np.array_equal(step, GLOBAL[key] + np.float32(0.25))  # not plain FedAvg


def test_a_secure_mean_that_fails_the_update_checks_is_not_applied(monkeypatch):
    outcome, record = _one_secure_round(monkeypatch, "fedavg", float("nan"))
    for key, start in GLOBAL.items():
        assert np.array_equal(outcome.arrays[key].numpy(), start)  # the round was skipped
    assert "NaN or Inf" in record.secure_aggregation["rejected"]
    assert "secure aggregate rejected" in record.skipped_round
    assert outcome.stopped is None  # the sites could train again next round


def test_measuring_what_a_plain_upload_would_cost_leaves_the_global_model_shipping_once():
    """The round record says what a plain round would have uploaded per site. Measuring it
    must not make Flower cache chunk copies on the global arrays: they go to every site in the
    masked-input message, and the engine would ship them twice (8.7 MB for a 4.4 MB model)."""
    import ray.cloudpickle as cloudpickle  # how Flower's engine ships a message to a site

    from privacy.compat import server_task_identity
    from server.secure_aggregation import SecAggSettings, _Stages

    arrays = ArrayRecord({"w": Array(np.random.default_rng(0).random(50_000, dtype=np.float32)),
                          "b": Array(np.zeros(8, dtype=np.float32))})
    shipped = len(cloudpickle.dumps(arrays))
    settings = SecAggSettings(threshold=None, neighbours=None, clip=0.5,
                              max_site_examples=100, stage_timeout_s=1.0)
    with server_task_identity(1, 0):
        messages = [Message(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord(
            {protocol.SERVER_ROUND: 1})}), dst_node_id=node, message_type="train", group_id="1")
            for node in (5, 6, 7)]
        stages = _Stages(settings, None, messages, timeout=1.0, train_timeout=1.0)
    plain_upload = RecordDict({protocol.ARRAYS: ArrayRecord(
        {k: Array(a.numpy()) for k, a in arrays.items()})})
    assert stages.record.plaintext_update_bytes == protocol.content_size(plain_upload)[0]
    assert len(cloudpickle.dumps(arrays)) == shipped  # not 2x: no cached chunk copies
    assert shipped < 50_000 * 4 * 1.05


def test_the_server_reads_a_masked_vector_in_place_and_anything_else_as_numpy_would():
    """A masked update is read as a view of the bytes Flower delivered (no 4 MB copy per site
    on the driver); any other array comes back exactly as Array.numpy() gives it, for the
    SecAgg server's own dtype and shape check to refuse."""
    vector = np.random.default_rng(3).integers(0, 2**32, 1000, dtype=np.uint32)
    array = Array(vector)
    read = masked_vector(array)
    np.testing.assert_array_equal(read, vector)
    assert read.dtype == np.uint32 and not read.flags.owndata and not read.flags.writeable
    others = [vector.astype(np.float32), vector.astype(">u4"), vector.reshape(20, 50),
              np.asfortranarray(vector.reshape(20, 50)), vector[:0]]
    for other in others:
        got, expected = masked_vector(Array(other)), Array(other).numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    truncated = Array(dtype="uint32", shape=(1000,), stype=array.stype, data=array.data[:-4])
    with pytest.raises(ValueError):
        truncated.numpy()
    with pytest.raises(ValueError):
        masked_vector(truncated)
