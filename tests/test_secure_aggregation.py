"""secagg=on: the server learns only the weighted mean of the sites' updates, and that mean is
the plaintext one up to a quantization error we bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.egress import EGRESS_LOG, read_log
from privacy import protocol
from privacy.secagg import setup
from privacy.secagg.loopback import run_round
from privacy.secagg.update import decode_mean, encode_update, mean_error_bound, site_weight
from server.settings import ConfigError, compose
from tests.conftest import run_simulation_cli

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


def test_a_site_that_declines_after_sharing_keys_is_recovered(runs):
    _, _, _, secure = runs
    first, second = (r["secure_aggregation"] for r in secure["rounds"])
    assert len(first["aggregated"]) == 3 and first["dropped"] == [] and not first["aborted"]
    declined = sorted(secure["rounds"][1]["declined"])
    assert declined, "the budget should make one site decline round 2"
    assert second["dropped"] == declined and len(second["aggregated"]) == 3 - len(declined)
    assert not second["aborted"]


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
