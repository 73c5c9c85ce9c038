"""The one place medsilo uses private internals of its pinned dependencies.

Everything here reaches past a public API: Flower's in-memory link state and simulation
delivery loop, its object-tree serialization and error codes, Opacus's per-parameter
"processed" flags, Ray's address resolution and GCS client. Such names change without notice
between releases, so they are used only through the functions below, only with the versions
in ``PINNED`` (checked when this module is imported), and ``tests/test_compat.py`` exercises
each of them so that an upstream change breaks a named test rather than a run.

To move to another version of a pinned package: change its pin in ``pyproject.toml`` and in
``PINNED`` together, run ``tests/test_compat.py``, and adapt what fails here.

Imports of the dependencies stay inside the functions: ``client/`` and ``server/`` import this
module (through ``privacy/protocol.py``), and neither needs Ray or Opacus loaded for that.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from queue import Empty, Queue
from typing import Any
from unittest import mock

from packaging.specifiers import SpecifierSet

# The versions whose internals this module was written against. flwr, torch and opacus are
# pinned in pyproject.toml; ray is pinned by flwr[simulation]==1.41.0 itself.
PINNED: dict[str, str] = {
    "flwr": "==1.41.0",
    "torch": "==2.13.0",  # local labels (+cpu, +cu128) match
    "opacus": "==1.6.*",
    "ray": "==2.55.1",
}

# What breaks if the package differs, for the error message.
_USED_INTERNALS = {
    "flwr": "the simulation engine's node ids and delivery loop, object-tree sizes, "
            "error codes",
    "torch": "Opacus 1.6's per-sample gradient hooks",
    "opacus": "the processed-gradient flags that secure noise (privacy/secure_noise.py) keeps",
    "ray": "the cluster address check of simulation.ray_address (simulations/engine.py)",
}


class PinnedVersionError(RuntimeError):
    """An installed dependency is not the version whose internals medsilo uses."""


def check_pinned_versions() -> None:
    """Raise :class:`PinnedVersionError` naming the first package not at its pinned version."""
    for package, spec in PINNED.items():
        try:
            installed: str | None = version(package)
        except PackageNotFoundError:
            installed = None
        if installed is not None and SpecifierSet(spec).contains(installed, prereleases=True):
            continue
        found = f"{package} {installed} is installed" if installed else f"{package} is missing"
        raise PinnedVersionError(
            f"{found}, but medsilo needs {package}{spec}: privacy/compat.py uses private "
            f"internals of that version ({_USED_INTERNALS[package]}). Install the pinned "
            f"versions with `pip install -e .` in a fresh virtual environment; to move to "
            f"another {package} version, change its pin in pyproject.toml and PINNED in "
            f"privacy/compat.py together and run `pytest tests/test_compat.py`."
        )


check_pinned_versions()


# ---- Flower: messages and records -----------------------------------------------------------

def deflated_tree_size(obj: Any) -> int:
    """Bytes of every serialized object Flower ships for ``obj`` (a record, an array, ...):
    the sum of ``deflate()`` over its nested object tree, ``obj`` included (Flower 1.41's
    ``flwr.supercore.inflatable``; objects are sent one by one, keyed by content hash)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(nested.deflate()) for nested in get_all_nested_objects(obj).values())


@contextlib.contextmanager
def hash_each_object_once() -> Iterator[None]:
    """Within this, each Flower object's id (a hash of its serialized bytes) is computed once:
    Flower 1.41 re-hashes every array chunk whenever an id is asked for, and measuring a reply
    (size, then id: privacy/protocol.py) asks two or three times (``no_object_id_recompute``,
    what Flower itself uses while pushing a message). Only for objects not changed inside."""
    from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

    with no_object_id_recompute():
        yield


def client_app_error_code() -> int:
    """The code Flower gives an error reply from a ClientApp that raised (``ErrorCode`` is not
    exported by Flower's public ``flwr.app``)."""
    from flwr.common.constant import ErrorCode

    return int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


# ---- Flower: the in-process simulation engine ------------------------------------------------

# the longest a wait of the engine's (delivery, replies) goes without looking (Flower's: 0.1 s)
POLL_S = 0.1

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


class _LinkStateSignals:
    """Events set each time Flower's in-memory link state stores a message for a site
    (``message_stored``) or a site's reply (``reply_stored``), so that whoever waits for one
    wakes when it comes instead of at its next 0.1 s poll. One waiter per event: it clears the
    event, looks, and waits on it (a store between the look and the wait leaves it set)."""

    def __init__(self, state: Any) -> None:
        self.message_stored, self.reply_stored = threading.Event(), threading.Event()
        store_ins, store_res = state.store_message_ins, state.store_message_res

        def store_message_ins(message: Any) -> Any:
            try:
                return store_ins(message)
            finally:
                self.message_stored.set()

        def store_message_res(message: Any) -> Any:
            try:
                return store_res(message)
            finally:
                self.reply_stored.set()

        # on this state object only (the run's one in-memory state), for its lifetime
        state.store_message_ins, state.store_message_res = store_message_ins, store_message_res


_SIGNALS_LOCK = threading.Lock()


def _link_state_signals(state: Any) -> _LinkStateSignals | None:
    """The signals of ``state``, installed on first use; None for a state that is not Flower
    1.41's in-memory link state (a deployed SuperLink's, a test double)."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not isinstance(state, InMemoryLinkState):
        return None
    with _SIGNALS_LOCK:
        signals = state.__dict__.get("_medsilo_signals")
        if signals is None:
            signals = state.__dict__["_medsilo_signals"] = _LinkStateSignals(state)
    return signals


def reply_signal(grid: Any) -> threading.Event | None:
    """An event set whenever a reply is stored where ``grid`` pulls from, when that is the
    simulation engine's in-memory link state (``InMemoryGrid.state``); None for any other grid
    (deployed, a test's). A wait for replies clears it, pulls, and waits on it with its poll
    interval as the bound: a reply is pulled as soon as it is stored (server/stopping.py)."""
    return (signals.reply_stored
            if (signals := _link_state_signals(getattr(grid, "state", None))) else None)


class _PickledOnce:
    """A ClientApp factory that the engine ships to its Ray actors as bytes pickled once.

    Flower's Ray backend passes its ClientApp factory along with every message
    (``actor.run.remote(app_fn, message, ...)``), and Ray pickles it every time: a closure over
    the whole ClientApp, pickled by value (18 kB, ~12 ms of the driver's CPU per message,
    measured; five messages per site per round under secure aggregation). This pickles it
    once; what Ray pickles per message is those bytes and their digest, and an actor unpickles
    each factory once (:func:`_client_app_factory`). The factory is still called for every
    message; it now returns the same ClientApp object to every message an actor runs, where
    each message had a fresh copy. An actor already shares its module globals between the
    sites it serves, and a ClientApp holds no site's state (that is in the site's Context).
    """

    def __init__(self, app_fn: Callable[[], Any]) -> None:
        import hashlib

        import ray.cloudpickle

        self._app_fn = app_fn
        self._pickled = ray.cloudpickle.dumps(app_fn)
        self._digest = hashlib.sha256(self._pickled).hexdigest()

    def __call__(self) -> Any:
        return self._app_fn()

    def __reduce__(self) -> tuple[Callable[[str, bytes], Any], tuple[str, bytes]]:
        return _client_app_factory, (self._digest, self._pickled)


_FACTORIES: dict[str, Any] = {}  # digest of a pickled ClientApp factory -> the factory
_FACTORIES_LOCK = threading.Lock()


def _client_app_factory(digest: str, pickled: bytes) -> Any:
    """The factory pickled as ``pickled``, unpickled once per process (a Ray actor)."""
    with _FACTORIES_LOCK:
        if digest not in _FACTORIES:
            import ray.cloudpickle

            _FACTORIES[digest] = ray.cloudpickle.loads(pickled)
        return _FACTORIES[digest]


@contextlib.contextmanager
def polled_by_pending_messages() -> Iterator[None]:
    """Flower's engine hands messages to simulated SuperNodes from one loop that, every 0.1 s,
    asks its link state for each node's next message; each ask checks every stored message, so
    a poll costs (nodes × stored messages) checks: ~0.1 s per poll at 1000 sites and 10 messages
    (half a core taken from the sites), seconds per poll when the last round asks all 1000
    sites. This loop asks only for the nodes that have an undelivered message, in partition
    order: the same messages, delivered the same way (``get_message_ins``, one per node per
    poll). It looks again as soon as the ServerApp stores a message (at the latest after
    0.1 s, as Flower's): a secure round sends five messages per site one after the other, and
    each waited 50 ms on average for the next poll. Flower 1.41's loop is
    ``vce_api.add_messages_to_queue``; it is replaced for the run.

    The ServerApp's wait for replies, when it is Flower's own (``InMemoryGrid.send_and_receive``:
    ``simulations.simulate`` without a stop signal), likewise pulls as soon as a reply is stored
    (:func:`reply_signal`) instead of every 0.1 s. And the engine's Ray backend ships its
    ClientApp factory pickled once, not once per message (:class:`_PickledOnce`).
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    original = vce_api.add_messages_to_queue
    build = RayBackend.build

    def build_pickled_once(self, app_fn) -> None:  # type: ignore[no-untyped-def]
        build(self, _PickledOnce(app_fn))

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
        if not hasattr(state, "message_ins_store"):  # not the in-memory state: Flower's loop
            original(state, queue, nodes_mapping, f_stop)
            return
        stored = _link_state_signals(state).message_stored  # type: ignore[union-attr]
        while not f_stop.is_set():
            stored.clear()  # before looking: a message stored from now on wakes the wait
            with state.lock:
                waiting = {msg.metadata.dst_node_id for msg in state.message_ins_store.values()
                           if msg.metadata.delivered_at == ""}
            for node_id in sorted(waiting & nodes_mapping.keys(), key=nodes_mapping.__getitem__):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            stored.wait(POLL_S)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        """Flower 1.41's ``InMemoryGrid.send_and_receive``, woken by each stored reply."""
        arrived = reply_signal(self)
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Any] = []
        while timeout is None or time.monotonic() < end:
            if arrived is not None:
                arrived.clear()
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in pulled)
            if not pending:
                break
            wait = (self.pull_interval if timeout is None
                    else max(0.0, min(self.pull_interval, end - time.monotonic())))
            if arrived is not None:
                arrived.wait(wait)
            else:
                time.sleep(wait)
        return replies

    with mock.patch.object(vce_api, "add_messages_to_queue", add_messages_to_queue), \
            mock.patch.object(InMemoryGrid, "send_and_receive", send_and_receive), \
            mock.patch.object(RayBackend, "build", build_pickled_once):
        yield


@dataclass
class SimulatedLinkState:
    """Flower's in-memory link state as ``run_simulation`` builds it, with one run; for tests
    and benchmarks of the two engine patches above on Flower's own code."""

    state: Any
    nodes: dict[int, int]  # node id -> partition (site index), as the engine registers them
    run_id: int
    grid: Any  # the ServerApp's grid on this state

    def push(self, node_ids: Iterable[int], message_type: str = "train") -> list[str]:
        """Store one empty message for each of ``node_ids``, as the ServerApp's grid does."""
        from flwr.app import Message, RecordDict

        return list(self.grid.push_messages(
            Message(RecordDict(), node_id, message_type, group_id="1") for node_id in node_ids))

    def reply(self, message: Any) -> None:
        """Store an empty reply to ``message`` (a delivered one), as the engine's worker does
        with a ClientApp's reply (``vce_api.worker``, ``put_message_into_state``)."""
        from uuid import uuid4

        from flwr.app import Message, RecordDict

        answer = Message(RecordDict(), reply_to=message)
        answer.metadata.__dict__["_message_id"] = str(uuid4())
        if self.state.store_message_res(answer) is None:
            raise RuntimeError(f"the link state refused a reply to {message.metadata.message_id}")

    def deliver(self, count: int, timeout: float = 10.0) -> list[int]:
        """Run the engine's delivery loop (Flower's, or the patched one where it is in place)
        until ``count`` messages came out; their destination node ids in delivery order."""
        from flwr.server.superlink.fleet.vce import vce_api

        out: Queue[Any] = Queue()
        stop = threading.Event()
        loop = threading.Thread(target=vce_api.add_messages_to_queue,
                                args=(self.state, out, self.nodes, stop), daemon=True)
        loop.start()
        try:
            delivered = [out.get(timeout=timeout).metadata.dst_node_id for _ in range(count)]
            with contextlib.suppress(Empty):  # nothing more may come out
                extra = out.get(timeout=0.3)
                delivered.append(extra.metadata.dst_node_id)
        finally:
            stop.set()
            if (signals := self.state.__dict__.get("_medsilo_signals")) is not None:
                signals.message_stored.set()  # the patched loop sees the stop at once
            loop.join(timeout=timeout)
        return delivered


@contextlib.contextmanager
def bounded_reply_downloads(max_time_s: float) -> Iterator[None]:
    """Deployed, Flower's Grid fetches each reply's objects (``HttpGrid.pull_messages`` →
    ``pull_objects``) retrying for up to ``PULL_MAX_TIME`` = 7200 s. A site that dies while
    uploading its reply leaves a reply listed whose objects never come: the ServerApp's wait
    blocks there (measured: 3 min, and the stage's other replies were lost with it). Bounded,
    the reply becomes Flower's own MESSAGE_UNAVAILABLE error reply after ``max_time_s``."""
    import functools

    from flwr.superlink.grid import http_grid

    bounded = functools.partial(http_grid.pull_objects, max_time=max_time_s)
    with mock.patch.object(http_grid, "pull_objects", bounded):
        yield


def flower_legacy_api() -> Any:
    """Flower 1.41's legacy stack, for measuring Flower's own SecAgg+ beside ours
    (simulations/benchmarks/secure_aggregation.py): ``SecAggPlusWorkflow`` runs only on the
    legacy ServerApp/strategy/``NumPyClient`` API with ``secaggplus_mod`` (/work/shared/NOTES.md).
    Not used by medsilo itself."""
    from types import SimpleNamespace

    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    return SimpleNamespace(
        ClientApp=ClientApp, NumPyClient=NumPyClient, secaggplus_mod=secaggplus_mod,
        ndarrays_to_parameters=ndarrays_to_parameters, LegacyContext=LegacyContext,
        ServerApp=ServerApp, ServerConfig=ServerConfig, FedAvg=FedAvg,
        DefaultWorkflow=DefaultWorkflow, SecAggPlusWorkflow=SecAggPlusWorkflow)


def flower_shamir() -> tuple[Any, Any]:
    """Flower 1.41's Shamir secret sharing ``(create_shares, combine_shares)``, for measuring it
    beside ours (privacy/secagg/benchmark.py). Not used by medsilo itself."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    return create_shares, combine_shares


@contextlib.contextmanager
def simulated_link_state(num_sites: int) -> Iterator[SimulatedLinkState]:
    """``num_sites`` virtual SuperNodes registered the way the engine registers them
    (``vce_api._register_nodes``), a run, and the ServerApp's identity set for the block."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    nodes = _register_nodes(num_sites, factory)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    grid = InMemoryGrid(factory)
    grid.set_run(state.get_run_info(run_ids=[run_id])[0])  # as run_simulation sets it
    with server_task_identity(run_id, SUPERLINK_NODE_ID):  # what the ServerApp thread sets
        yield SimulatedLinkState(state, nodes, run_id, grid)


@contextlib.contextmanager
def server_task_identity(run_id: int, node_id: int) -> Iterator[None]:
    """The ServerApp's task identity for the block, as Flower's SuperExec (or its legacy
    in-process ``run_simulation``) sets it: ``Message()`` reads it. For running the ServerApp
    in-process without a SuperLink (tests/in_process_grid.py); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: getattr(TaskIdentity, name) for name in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = run_id, node_id, 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


# ---- Opacus ----------------------------------------------------------------------------------

def check_processed_flag(summed_grad: Any) -> None:
    """Raise as Opacus does where a parameter's clipped gradient sum was already noised (a
    second ``add_noise`` without a new backward pass would add noise to noise)."""
    from opacus.optimizers.optimizer import _check_processed_flag

    _check_processed_flag(summed_grad)


def mark_as_processed(summed_grad: Any) -> None:
    """Flag a parameter's clipped gradient sum as noised, as Opacus's own ``add_noise`` does."""
    from opacus.optimizers.optimizer import _mark_as_processed

    _mark_as_processed(summed_grad)


# ---- Ray -------------------------------------------------------------------------------------

def ray_bootstrap_address(address: str) -> str | None:
    """The GCS address ``ray.init(address=...)`` would dial: ``auto`` and ``RAY_ADDRESS``
    resolved, localhost turned into the node IP; None for ``local`` (a private instance).
    Raises ConnectionError or ValueError where no cluster can be named."""
    from ray._private.services import canonicalize_bootstrap_address

    gcs = canonicalize_bootstrap_address(address)
    return None if gcs is None else str(gcs)


def ray_gcs_answers(gcs: str) -> None:
    """Ask the GCS at ``gcs`` for its cluster id (about a second); raises
    ``ray.exceptions.RpcError`` where what answers there is no Ray GCS."""
    from ray._raylet import GcsClient

    GcsClient(address=gcs)
