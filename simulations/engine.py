"""The one place that starts Flower's in-process simulation engine (Ray).

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``, but it is the
only way to run a ServerApp and ClientApp objects built in this process (our Hydra config,
pooled evaluation and progress callback live in them). Nothing else calls it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    num_sites: int,
    *,
    client_cpus: float,
    client_gpus: float,
    ray_init: Mapping[str, Any] | None = None,
    verbose: bool = False,
    seed: int = 0,
) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Flower logs every round at INFO and warns that run_simulation is deprecated;
        # the rich progress shows rounds, and errors still come through.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": verbose,
                      "logging_level": logging.INFO if verbose else logging.ERROR,
                      **dict(ray_init or {})},
    }
    with warnings.catch_warnings(), seeded_node_ids(seed):
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config=backend_config,
            verbose_logging=verbose,
        )


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

    original = in_memory_linkstate.generate_rand_int_from_bytes
    draw = random.Random(f"medsilo-simulated-node-ids:{seed}")

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = draw.getrandbits(8 * num_bytes)
            if not exclude or value not in exclude:
                return value

    in_memory_linkstate.generate_rand_int_from_bytes = seeded
    try:
        yield
    finally:
        in_memory_linkstate.generate_rand_int_from_bytes = original
