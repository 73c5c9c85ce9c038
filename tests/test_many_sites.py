"""Many hospitals (issue 9): per-round sampling, exact accounting under partial participation."""

from __future__ import annotations

import contextlib

import pytest
from opacus.accountants import create_accountant

from privacy.compat import polled_by_pending_messages, seeded_node_ids, simulated_link_state
from server.settings import ConfigError, compose, sites_per_round
from server.strategy import build_strategy
from tests.helpers import run_simulation_cli
from tests.in_process_grid import simulate_in_process


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def _sampled(strategy, grid, server_round, stage):
    return sorted(strategy._sample(grid, server_round, stage).get_node_ids())


def test_sampling_is_seeded_per_round_and_the_last_evaluation_asks_everyone(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)  # what the ServerApp process sets
    nodes = [7 * i + 3 for i in range(100)]
    grid = FakeGrid(reversed(nodes))  # the order Flower lists nodes in does not matter
    strategy = build_strategy({"name": "fedavg"}, 100, sites_per_round=10,
                              seed=4, final_round=3)
    again = build_strategy({"name": "fedavg"}, 100, sites_per_round=10,
                           seed=4, final_round=3)
    other_seed = build_strategy({"name": "fedavg"}, 100, sites_per_round=10,
                                seed=5, final_round=3)
    rounds = [_sampled(strategy, grid, r, "train") for r in (1, 2, 3)]
    assert all(len(set(s)) == 10 and set(s) <= set(nodes) for s in rounds)
    assert rounds == [_sampled(again, FakeGrid(nodes), r, "train") for r in (1, 2, 3)]
    assert len({tuple(s) for s in rounds}) == 3  # a new sample every round
    assert rounds != [_sampled(other_seed, grid, r, "train") for r in (1, 2, 3)]
    assert len(_sampled(strategy, grid, 2, "evaluate")) == 10
    assert _sampled(strategy, grid, 3, "evaluate") == sorted(nodes)
    sampled_only = build_strategy({"name": "fedavg"}, 100, sites_per_round=10,
                                  seed=4, final_round=None)  # final_evaluation=sampled
    assert len(_sampled(sampled_only, grid, 3, "evaluate")) == 10
    # Flower's own configure_train addresses exactly the sampled sites
    from flwr.app import ArrayRecord, ConfigRecord

    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == rounds[0]


def test_without_sites_per_round_every_site_trains():
    grid = FakeGrid(range(1, 6))
    strategy = build_strategy({"name": "fedavg"}, 5, sites_per_round=None)
    assert _sampled(strategy, grid, 1, "train") == [1, 2, 3, 4, 5]
    assert sites_per_round(compose(["num_hospitals=8"])) == 8
    assert sites_per_round(compose(["num_hospitals=8", "sites_per_round=0.25"])) == 2
    assert sites_per_round(compose(["num_hospitals=8", "sites_per_round=20"])) == 8


@pytest.mark.parametrize("override", ["sites_per_round=0", "sites_per_round=1.5",
                                      "sites_per_round=abc", "final_evaluation=some"])
def test_a_bad_sites_per_round_is_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose([override])


def test_secure_aggregation_needs_two_sites_a_round():
    with pytest.raises(ConfigError, match="sites_per_round must be at least 2 sites a round"):
        compose(["secagg=on", "num_hospitals=10", "sites_per_round=1"])
    assert compose(["secagg=on", "num_hospitals=10", "sites_per_round=0.2"])


def test_sites_per_round_and_a_strategy_fraction_cannot_both_choose():
    with pytest.raises(ConfigError, match="strategy.fraction_train"):
        compose(["sites_per_round=3", "strategy.fraction_train=0.5"])


def test_simulated_node_ids_are_seeded():
    def node_ids(seed):
        with seeded_node_ids(seed), simulated_link_state(5) as link:
            return sorted(link.nodes, key=link.nodes.get)  # in partition (site) order

    assert node_ids(1) == node_ids(1) != node_ids(2)
    assert all(0 < value < 2**64 for value in node_ids(1))


def test_messages_reach_only_nodes_that_have_one_in_partition_order():
    """The engine's delivery loop (replaced: Flower's asks every node every 0.1 s), run on
    Flower's own in-memory link state with messages stored by the ServerApp's grid, hands the
    queue exactly the undelivered messages, once, in partition order, as Flower's loop does."""
    def delivered(patched):
        with seeded_node_ids(0), simulated_link_state(6) as link:
            by_partition = sorted(link.nodes, key=link.nodes.get)
            link.push(by_partition[i] for i in (4, 0, 2))
            asked, get_message_ins = set(), link.state.get_message_ins

            def recorded(node_id, limit, **kwargs):
                asked.add(link.nodes[node_id])
                return get_message_ins(node_id=node_id, limit=limit, **kwargs)

            link.state.get_message_ins = recorded
            with polled_by_pending_messages() if patched else contextlib.nullcontext():
                out = link.deliver(3)  # waits a moment for any extra message
            return [link.nodes[node_id] for node_id in out], asked

    (ours, asked_by_ours), (flowers, asked_by_flowers) = delivered(True), delivered(False)
    assert ours == flowers == [0, 2, 4]
    assert asked_by_ours == {0, 2, 4}  # only the sites with a message waiting
    assert asked_by_flowers == set(range(6))  # Flower's loop asks every site


def test_the_engine_gives_site_i_the_same_node_id_for_the_same_seed():
    """What run-level sampling determinism rests on: Flower registers partition i (our i-th
    site) as a node whose id now depends only on the seed, so the sorted ids, hence the
    seeded sample, name the same sites run after run."""
    def mapping(seed):
        with seeded_node_ids(seed), simulated_link_state(20) as link:  # as run_simulation does
            return link.nodes

    first = mapping(7)
    assert first == mapping(7) and sorted(first.values()) == list(range(20))
    assert first != mapping(8)


# ---- end to end -------------------------------------------------------------------------

PARTIAL = ("task=tabular", "num_hospitals=6", "sites_per_round=3", "rounds=5",
           "local_epochs=1", "privacy=dp", "privacy.noise_multiplier=1.0",
           "privacy.target_epsilon=null", "seed=3")


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial")
    # the sites in this process: the accounting under sampling, not the engine, is tested
    return out, simulate_in_process(out, *PARTIAL, f"data.cache_dir={out / 'cache'}")


def test_a_site_is_charged_only_for_the_rounds_it_trained(partial):
    _, report = partial
    trained = {}
    for rnd in report["rounds"]:
        assert len(rnd["train"]) == 3 and rnd["asked"] == 3
        for site in rnd["train"]:
            trained.setdefault(site, []).append(rnd["round"])
    assert 2 in {len(r) for r in trained.values()}, trained  # the case the issue names
    assert len(report["rounds"][-1]["sites"]) == 6  # final_evaluation=all: every site
    for site, ledger in report["privacy"].items():
        rounds = trained.get(site, [])
        assert ledger["rounds_trained"] == len(rounds), site
        if not rounds:
            continue
        steps_per_round = ledger["steps"] // len(rounds)
        assert ledger["steps"] == steps_per_round * len(rounds)
        accountant = create_accountant(mechanism=ledger["accountant"])
        # the noisy count release first (σ = count_noise, q = 1, one step), then DP-SGD
        accountant.history = [(ledger["count_noise"], 1.0, 1),
                              (ledger["noise_multiplier"], ledger["sample_rate"],
                               ledger["steps"])]
        assert ledger["epsilon"] == pytest.approx(accountant.get_epsilon(ledger["delta"]),
                                                  rel=1e-9), site
        # ε grew only in the rounds the site trained
        assert len(ledger["epsilon_per_round"]) == len(rounds)


@pytest.mark.slow
def test_two_hundred_sites_five_per_round_written_on_first_use(tmp_path):
    cache = tmp_path / "cache"
    report = run_simulation_cli(tmp_path, "task=tabular", "num_hospitals=200",
                                "sites_per_round=5", "rounds=3", "local_epochs=1",
                                "final_evaluation=sampled", f"data.cache_dir={cache}")
    assert report["run"]["num_hospitals"] == 200
    trained = [set(r["train"]) for r in report["rounds"]]
    evaluated = [set(r["sites"]) for r in report["rounds"]]
    assert all(len(sites) == 5 for sites in trained + evaluated)
    assert len(set().union(*trained)) > 5  # different hospitals in different rounds
    assert report["final"]["global"]["loss"] < report["initial"]["global"]["loss"]
    assert not any(r["failures"] or r["timed_out"] for r in report["rounds"])
    # the server's pooled evaluation: a fixed sample of 50 sites' test splits, named
    pooled = set(report["run"]["pooled_evaluation_sites"])
    assert len(pooled) == 50
    # only the sites something needed were written (data.generate=on_first_use)
    written = {p.name for p in next((cache / "synthetic").iterdir()).iterdir() if p.is_dir()}
    assert written == pooled | set().union(*trained) | set().union(*evaluated)
    md = (tmp_path / "report.md").read_text()
    assert "50 of the 200 sites" in md and len(md.splitlines()) < 150  # summarized
    participation = {site: entry["rounds_trained"] for site, entry in report["sites"].items()}
    assert sum(participation.values()) == 15
    assert {s for s, n in participation.items() if n} == set().union(*trained)
    assert len((tmp_path / "sites.csv").read_text().splitlines()) == len(participation) + 1


@pytest.mark.slow
@pytest.mark.parametrize("rounds_trained", [1, 2, 5])
def test_a_site_sampled_in_fewer_rounds_stays_within_its_target_epsilon(rounds_trained):
    """The site plans σ for every round of the run (it cannot know how often it will be
    sampled): training in only some of them keeps its ε at or below the target."""
    from client.privacy_budget import plan_ledger
    from client.training import dp_schedule

    privacy = compose(["privacy=dp", "privacy.target_epsilon=2.0"])["privacy"]
    ledger = plan_ledger(privacy, num_train=300, batch_size=32, epochs=1, rounds=5,
                         max_epsilon=None)
    _, steps = dp_schedule(300, 32, 1)
    eps = [ledger.record_round(steps) for _ in range(rounds_trained)]
    assert eps == sorted(eps) and eps[-1] <= 2.0
    if rounds_trained == 5:  # planned for exactly this: the target is nearly reached
        assert eps[-1] >= 0.9 * 2.0
    else:
        assert eps[-1] < 0.9 * 2.0

