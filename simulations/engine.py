"""The one place that starts Flower's in-process simulation engine (Ray).

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``, but it is the
only way to run a ServerApp and ClientApp objects built in this process (our Hydra config,
pooled evaluation and progress callback live in them). Nothing else calls it.

Ray runs either privately (started and stopped with the run; ``simulation.ray_address: null``)
or on an existing cluster (``simulation.ray_address: HOST:PORT``, docs/ray_cluster.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import warnings
from collections.abc import Iterator
from typing import Any
from unittest import mock

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from server.settings import ConfigError

# ray.init retries a refused or silent GCS port for minutes (measured: still waiting after 5 min);
# a plain TCP connect gives up after this long
CLUSTER_PROBE_TIMEOUT_S = 5.0


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    num_sites: int,
    *,
    client_cpus: float,
    client_gpus: float,
    ray_address: str | None = None,
    object_store_mb: int | None = None,
    verbose: bool = False,
    seed: int = 0,
) -> None:
    """``ray_address``: an existing cluster's GCS address (``HOST:PORT`` or ``auto``), checked
    to answer before Flower starts; None: a private local Ray instance, even where ``RAY_ADDRESS``
    is set or a ``ray start`` head runs on this machine (Ray would join those by default).
    ``object_store_mb``: the private instance's object store; refused with a cluster address."""
    from flwr.simulation import run_simulation

    init_args = _ray_init_args(ray_address, object_store_mb)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Flower logs every round at INFO and warns that run_simulation is deprecated;
        # the rich progress shows rounds, and errors still come through.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": verbose,
                      "logging_level": logging.INFO if verbose else logging.ERROR, **init_args},
    }
    with warnings.catch_warnings(), seeded_node_ids(seed), polled_by_pending_messages():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config=backend_config,
            verbose_logging=verbose,
        )


def _ray_init_args(address: str | None, object_store_mb: int | None) -> dict[str, Any]:
    """ray.init arguments for a private instance or for joining the cluster at ``address``."""
    if address is None:
        # "local": always a new instance; ray.init(address=None) would join the cluster named by
        # RAY_ADDRESS or by the last `ray start` on this machine, contrary to the config's promise
        args: dict[str, Any] = {"address": "local"}
        if object_store_mb is not None:
            args["object_store_memory"] = int(object_store_mb) * 1024 * 1024
        return args
    # simulation.object_store_mb with an address and a ray:// address are refused by
    # server/settings.py before anything starts
    _check_cluster_answers(address)
    # nothing a cluster node fixes at `ray start` (num_cpus, object_store_memory, ...) is passed
    return {"address": address}


def _check_cluster_answers(address: str) -> None:
    """Fail in seconds, naming the config key, where ray.init would wait for minutes."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # the address ray.init will dial: "auto" and RAY_ADDRESS resolved, localhost → node IP
        gcs = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as err:
        raise ConfigError(f"simulation.ray_address={address!r} names no Ray cluster: {err}; "
                          "start one with `ray start --head` (docs/ray_cluster.md)") from err
    if gcs is None:  # "local": Ray's word for a private instance
        raise ConfigError(f"simulation.ray_address={address!r} names no cluster; a private local "
                          "Ray instance is simulation.ray_address=null")
    host, _, port = str(gcs).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)),
                                      timeout=CLUSTER_PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"simulation.ray_address={address!r}: no Ray cluster answers at {gcs} ({err}); "
            "start its head with `ray start --head --port=PORT` and check the host, the port and "
            "the firewall (docs/ray_cluster.md), or set simulation.ray_address=null for a "
            "private local Ray") from err
    from ray._raylet import GcsClient
    from ray.exceptions import RpcError

    try:
        # a port that accepts connections may still be no Ray GCS (another service, a proxy):
        # fetching the cluster id answers in about a second where ray.init would keep retrying
        GcsClient(address=gcs)
    except RpcError as err:
        raise ConfigError(
            f"simulation.ray_address={address!r}: {gcs} accepts connections but is no Ray "
            f"cluster's head ({err}); give the address `ray start --head` printed "
            "(docs/ray_cluster.md)") from err


@contextlib.contextmanager
def seeded_node_ids(seed: int) -> Iterator[None]:
    """Simulated SuperNodes get node ids drawn from ``seed`` instead of ``os.urandom``.

    Flower registers virtual SuperNode i (partition i, our i-th site) as the i-th node, with a
    random 64-bit id; the strategy samples sites per round from the sorted node ids
    (``server/strategy.py``). Seeded ids make "which hospitals train in round r" the same for
    the same seed, run after run. Flower 1.41 draws the ids in its in-memory link state (the
    engine's only state); the draw is replaced there for the duration of the run.
    """
    from flwr.server.superlink.linkstate import in_memory_linkstate

    draw = random.Random(f"medsilo-simulated-node-ids:{seed}")

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = draw.getrandbits(8 * num_bytes)
            if not exclude or value not in exclude:
                return value

    with mock.patch.object(in_memory_linkstate, "generate_rand_int_from_bytes", seeded):
        yield


@contextlib.contextmanager
def polled_by_pending_messages() -> Iterator[None]:
    """Flower's engine hands messages to simulated SuperNodes from one loop that, every 0.1 s,
    asks its link state for each node's next message; each ask checks every stored message, so
    a poll costs (nodes × stored messages) checks: ~0.1 s per poll at 1000 sites and 10 messages
    (half a core taken from the sites), seconds per poll when the last round asks all 1000
    sites. This loop asks only for the nodes that have an undelivered message, in partition
    order: the same messages, delivered the same way (``get_message_ins``, one per node per
    poll). Flower 1.41's loop is ``vce_api.add_messages_to_queue``; it is replaced for the run.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
        if not hasattr(state, "message_ins_store"):  # not the in-memory state: Flower's loop
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                waiting = {msg.metadata.dst_node_id for msg in state.message_ins_store.values()
                           if msg.metadata.delivered_at == ""}
            for node_id in sorted(waiting & nodes_mapping.keys(), key=nodes_mapping.__getitem__):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)

    with mock.patch.object(vce_api, "add_messages_to_queue", add_messages_to_queue):
        yield
