"""The one place that starts Flower's in-process simulation engine (Ray).

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``, but it is the
only way to run a ServerApp and ClientApp objects built in this process (our Hydra config,
pooled evaluation and progress callback live in them). Nothing else calls it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
