"""The one place that starts Flower's in-process simulation engine (Ray).

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``, but it is the
only way to run a ServerApp and ClientApp objects built in this process (our Hydra config,
pooled evaluation and progress callback live in them). Nothing else calls it.

Ray runs either privately (started and stopped with the run; ``simulation.ray_address: null``)
or on an existing cluster (``simulation.ray_address: HOST:PORT``, docs/ray_cluster.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

# Flower 1.41 internals patched for the run (privacy/compat.py, the one home of such patches):
# seeded node ids (same sites sampled for the same seed), a delivery loop that scales to
# 1000 sites
from privacy.compat import (
    polled_by_pending_messages,
    ray_bootstrap_address,
    ray_gcs_answers,
    seeded_node_ids,
)
from server.settings import ConfigError
from server.stopping import StopSignal

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
    stop: StopSignal | None = None,
    on_stop: Callable[[str], None] | None = None,
) -> None:
    """``ray_address``: an existing cluster's GCS address (``HOST:PORT`` or ``auto``), checked
    to answer before Flower starts; None: a private local Ray instance, even where ``RAY_ADDRESS``
    is set or a ``ray start`` head runs on this machine (Ray would join those by default).
    ``object_store_mb``: the private instance's object store; refused with a cluster address.
    ``stop``: set by SIGINT/SIGTERM while the run lasts (the ServerApp built with it then stops
    at its next wait, see :func:`stop_on_signals`); ``on_stop(signal name)`` is told first."""
    # the driver's Ray core worker would install a C++ handler for SIGTERM (it logs and aborts,
    # exit -6) over ours: read by Ray when it is first imported, so set before that
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray
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
    # Flower's engine runs on a thread of its own, as Flower's stock run_simulation would on the
    # main one: its ServerApp starts round 1 while Ray starts (the time to first round of stock
    # Flower, issue 18), and Ray, started off the main thread, installs no SIGTERM handler of its
    # own (ray.init does so only on the main thread; it would end the driver without a report).
    # The main thread keeps the signal handlers installed here and waits for the engine.
    failure: list[BaseException] = []

    def engine() -> None:
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except BaseException as err:  # handed to the main thread, raised there
            failure.append(err)

    try:
        with warnings.catch_warnings(), seeded_node_ids(seed), polled_by_pending_messages(), \
                stop_on_signals(stop, on_stop) as reinstall_handlers:
            warnings.simplefilter("ignore", DeprecationWarning)
            thread = threading.Thread(target=engine, name="flower-simulation-engine", daemon=True)
            thread.start()
            ray_up = False
            while thread.is_alive():  # short waits: a signal's handler runs between them
                thread.join(0.1)
                if not ray_up and ray.is_initialized():
                    # where Ray was imported before (a notebook) its core worker took SIGTERM
                    ray_up = True
                    reinstall_handlers()
    finally:
        if ray.is_initialized():  # Flower shuts Ray down at the end; not if it failed to start
            ray.shutdown()
    # after a stop, an engine error is the signal's doing (the same Ctrl-C reached Ray's
    # workers): the report written by the ServerApp says how the run ended
    if failure and not (stop is not None and stop.requested):
        raise failure[0]


# after a stop, once the ServerApp has written its report, Flower's engine and Ray get this long
# to shut down; a signal sent to the whole process group (systemd, SLURM, `kill -- -PGID`) also
# stops Ray's workers and its driver then waits ~8 s on them (measured), so the process ends
# without waiting further
ENGINE_SHUTDOWN_GRACE_S = 5.0
# the ServerApp stops at its next wait for the sites (0.1 s) unless it is in server-side work
# (pooled evaluation, a checkpoint): never wait longer than this for its report
REPORT_GRACE_S = 60.0


@contextmanager
def stop_on_signals(stop: StopSignal | None,
                    on_stop: Callable[[str], None] | None = None
                    ) -> Iterator[Callable[[], None]]:
    """While the run lasts, SIGINT (Ctrl-C) and SIGTERM request a clean stop; a second one ends
    the process at once (exit 128 + signal number), its child processes (Ray's) killed first.

    A terminal's Ctrl-C reaches Ray's processes too (same process group); Ray's workers finish
    the task they run, so Flower's engine drains and shuts Ray down once the ServerApp returns.
    If that takes longer than ``ENGINE_SHUTDOWN_GRACE_S`` after the report is written, the
    process ends anyway (``stop.before_exit`` first), its children killed. Yields a function
    that installs the handlers again, over any a library put in their place.
    """
    if stop is None:
        yield lambda: None
        return
    returned = threading.Event()

    def force_exit(signum: int) -> None:
        if stop.before_exit is not None:
            stop.before_exit()
        _kill_descendants(os.getpid())
        os._exit(128 + signum)

    def watchdog(signum: int) -> None:
        stop.finished.wait(REPORT_GRACE_S)
        if not returned.wait(ENGINE_SHUTDOWN_GRACE_S):
            force_exit(signum)

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.requested:  # asked twice: no more waiting
            _kill_descendants(os.getpid())
            os._exit(128 + signum)
        stop.request(name)
        # from here on, errors of Ray workers that the same signal stopped are expected noise
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        if on_stop is not None:
            on_stop(name)
        threading.Thread(target=watchdog, args=(signum,), daemon=True).start()

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGINT, signal.SIGTERM)}

    def reinstall() -> None:
        """Ours again at the OS level, should a library have replaced them below Python."""
        for signum in previous:
            signal.signal(signum, handler)

    try:
        yield reinstall
    finally:
        returned.set()
        for signum, old in previous.items():
            signal.signal(signum, old)


def children_by_parent() -> dict[int, list[int]]:
    """Every running process's children, read from /proc (Linux; elsewhere: none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _kill_descendants(pid: int) -> None:
    """SIGKILL every process below ``pid``."""
    children = children_by_parent()
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        stack += children.get(child, [])
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
    try:
        # the address ray.init will dial: "auto" and RAY_ADDRESS resolved, localhost → node IP
        gcs = ray_bootstrap_address(address)
    except (ConnectionError, ValueError) as err:
        raise ConfigError(f"simulation.ray_address={address!r} names no Ray cluster: {err}; "
                          "start one with `ray start --head` (docs/ray_cluster.md)") from err
    if gcs is None:  # "local": Ray's word for a private instance
        raise ConfigError(f"simulation.ray_address={address!r} names no cluster; a private local "
                          "Ray instance is simulation.ray_address=null")
    host, _, port = gcs.rpartition(":")
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
    from ray.exceptions import RpcError

    try:
        # a port that accepts connections may still be no Ray GCS (another service, a proxy):
        # fetching the cluster id answers in about a second where ray.init would keep retrying
        ray_gcs_answers(gcs)
    except RpcError as err:
        raise ConfigError(
            f"simulation.ray_address={address!r}: {gcs} accepts connections but is no Ray "
            f"cluster's head ({err}); give the address `ray start --head` printed "
            "(docs/ray_cluster.md)") from err
