"""privacy/compat.py: the pinned versions, and each private internal it wraps, used for real.

When a pinned dependency moves, these are the tests that should break first, each naming the
internal that changed (see the module docstring of privacy/compat.py for how to move a pin).
"""

from __future__ import annotations

import ast
import re
import tomllib
from concurrent import futures
from importlib.metadata import requires, version

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from privacy import compat
from tests.helpers import ROOT

PACKAGES = ("client", "server", "privacy", "simulations", "models")
# Flower's documented public API; anything else under flwr is an internal
FLOWER_PUBLIC = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy",
                 "flwr.simulation"}


def _pyproject_pins() -> dict[str, str]:
    """``name -> version`` for every ``==`` dependency in pyproject.toml (extras dropped)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[requirement.name] = exact[0]
    return pins


def _installed(package: str) -> str:
    # torch's +cpu / +cu128 label names the build, not the version
    return Version(version(package)).public


def test_the_installed_versions_are_the_pins_in_pyproject():
    pins = _pyproject_pins()
    assert {"flwr", "torch", "opacus"} <= pins.keys(), pins
    for package, pinned in pins.items():
        assert _installed(package) == pinned, (
            f"{package} {version(package)} is installed but pyproject.toml pins {pinned}: "
            "check privacy/compat.py against the new version (its module docstring)")


def test_ray_is_the_version_flower_pins():
    (ray_pin,) = {str(Requirement(r).specifier) for r in requires("flwr") or []
                  if Requirement(r).name == "ray"}
    assert ray_pin == compat.PINNED["ray"]
    assert _installed("ray") == ray_pin.removeprefix("==")


def test_compat_expects_what_pyproject_pins():
    pins = _pyproject_pins()
    for package in ("flwr", "torch", "opacus"):
        assert compat.SpecifierSet(compat.PINNED[package]).contains(pins[package]), package
    compat.check_pinned_versions()  # the installed environment passes its own import check


@pytest.mark.parametrize("package,installed", [("flwr", "1.42.0"), ("opacus", "1.7.0"),
                                               ("torch", "2.14.0+cpu"), ("ray", None)])
def test_another_version_is_refused_naming_package_installed_expected_and_the_fix(
        monkeypatch, package, installed):
    def fake_version(name):
        if name != package:
            return version(name)
        if installed is None:
            raise compat.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(compat, "version", fake_version)
    found = f"{package} {installed} is installed" if installed else f"{package} is missing"
    with pytest.raises(compat.PinnedVersionError) as refused:
        compat.check_pinned_versions()
    message = str(refused.value)
    assert message.startswith(f"{found}, but medsilo needs {package}{compat.PINNED[package]}")
    assert "pip install -e ." in message and "pyproject.toml" in message
    assert "tests/test_compat.py" in message


def test_a_local_build_label_and_an_opacus_patch_release_are_accepted(monkeypatch):
    fake = {"torch": "2.13.0+cu128", "opacus": "1.6.1"}
    monkeypatch.setattr(compat, "version", lambda name: fake.get(name) or version(name))
    compat.check_pinned_versions()


# ---- Flower: object-tree size ----------------------------------------------------------------

def test_the_deflated_size_counts_every_nested_array_flower_ships():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    def arrays(n):
        return ArrayRecord({"w": Array(np.zeros(n, dtype=np.float32)),
                            "b": Array(np.ones(3, dtype=np.float32))})

    small, large = compat.deflated_tree_size(arrays(1000)), compat.deflated_tree_size(arrays(2000))
    assert 4000 + 12 < small < 4000 + 12 + 1024  # the raw bytes plus some framing
    assert large - small == 4000  # one more float32 per element, nothing else
    # the record's own deflate holds references only: the arrays are separate objects
    assert small > len(arrays(1000).deflate()) + 4000
    content = RecordDict({"arrays": arrays(1000), "metrics": MetricRecord({"loss": 0.5})})
    from privacy.protocol import content_size

    total, per_record = content_size(content)
    assert per_record == {"arrays": small, "metrics": compat.deflated_tree_size(content["metrics"])}
    assert total == sum(per_record.values()) + len(content.deflate())


def test_a_measure_with_each_object_hashed_once_gives_flowers_own_size_and_id():
    """protocol.measure hashes inside compat.hash_each_object_once (Flower's
    no_object_id_recompute): the same size as content_size and the same id as Flower computes
    without it, for an array of two 5 MB chunks, and the measured content itself is left as
    it was (a later id, computed normally, agrees)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from privacy.protocol import content_size, measure

    def content():
        rng = np.random.default_rng(0)
        return RecordDict({"arrays": ArrayRecord({
            "w": Array(rng.normal(size=1_500_000).astype(np.float32)),  # 2 chunks
            "b": Array(np.ones(3, dtype=np.float32))}),
            "metrics": MetricRecord({"loss": 0.5})})

    measured = content()
    total, per_record, object_id = measure(measured)
    assert (total, per_record) == content_size(content())
    assert object_id == content().object_id == measured.object_id


def test_the_client_app_error_code_is_flowers():
    from flwr.app import Error

    assert compat.client_app_error_code() == Error(code=compat.client_app_error_code()).code
    assert compat.client_app_error_code() > 0


# ---- Flower: the engine patches ---------------------------------------------------------------

def test_the_engine_patches_are_applied_for_the_block_and_restored():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.server.superlink.linkstate import in_memory_linkstate
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    draw, loop = in_memory_linkstate.generate_rand_int_from_bytes, vce_api.add_messages_to_queue
    wait, build = InMemoryGrid.send_and_receive, RayBackend.build
    with compat.seeded_node_ids(1), compat.polled_by_pending_messages():
        assert in_memory_linkstate.generate_rand_int_from_bytes is not draw
        assert vce_api.add_messages_to_queue is not loop
        assert InMemoryGrid.send_and_receive is not wait and RayBackend.build is not build
        with compat.simulated_link_state(4) as link:
            seeded = sorted(link.nodes)
    assert in_memory_linkstate.generate_rand_int_from_bytes is draw
    assert vce_api.add_messages_to_queue is loop
    assert InMemoryGrid.send_and_receive is wait and RayBackend.build is build
    with compat.seeded_node_ids(1), compat.simulated_link_state(4) as link:
        assert sorted(link.nodes) == seeded


def test_a_stored_message_is_handed_out_at_once_not_at_the_next_poll(monkeypatch):
    """A secure round sends each site five messages one after the other; each used to wait for
    the delivery loop's next 0.1 s poll. With polls 30 s apart, only the wake-up can deliver."""
    import threading
    import time

    monkeypatch.setattr(compat, "POLL_S", 30.0)
    with compat.polled_by_pending_messages(), compat.simulated_link_state(3) as link:
        node = min(link.nodes, key=link.nodes.get)
        threading.Timer(0.3, link.push, args=([node],)).start()  # stored while the loop waits
        started = time.monotonic()
        assert link.deliver(1, timeout=20) == [node]
        assert time.monotonic() - started < 10


def test_a_stored_reply_wakes_the_servers_wait_not_its_next_poll(monkeypatch):
    """``reply_signal`` is set by every reply the in-memory link state stores; Flower's own
    ``InMemoryGrid.send_and_receive`` (patched for the run) returns once the last reply is
    stored, though it would pull only every 30 s here."""
    import threading
    import time

    from flwr.app import Message, RecordDict

    assert compat.reply_signal(object()) is None  # not the simulation's grid: polls only
    with compat.polled_by_pending_messages(), compat.simulated_link_state(3) as link:
        arrived = compat.reply_signal(link.grid)
        assert arrived is not None and compat.reply_signal(link.grid) is arrived
        link.grid.pull_interval = 30.0
        node = min(link.nodes, key=link.nodes.get)

        def answer() -> None:  # a site's reply, 0.3 s after the message is stored
            time.sleep(0.3)
            (message,) = link.state.get_message_ins(node_id=node, limit=1)
            link.reply(message)

        threading.Thread(target=answer, daemon=True).start()
        started = time.monotonic()
        replies = list(link.grid.send_and_receive(
            [Message(RecordDict(), node, "train", group_id="1")], timeout=60))
        assert time.monotonic() - started < 10
        assert [r.metadata.src_node_id for r in replies] == [node]


class _CountedFactory:
    """A ClientApp factory that counts how often it is pickled."""

    pickled = 0

    def __call__(self) -> str:
        return "the ClientApp"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        _CountedFactory.pickled += 1
        return _CountedFactory, ()


def test_the_client_app_factory_is_pickled_once_not_with_every_message():
    """Ray pickles the backend's factory with every message it sends an actor (as it does
    below); the factory itself is pickled once, and an actor unpickles it once."""
    import ray.cloudpickle

    _CountedFactory.pickled = 0
    shipped = compat._PickledOnce(_CountedFactory())
    assert shipped() == "the ClientApp"  # the driver may call it too
    per_message = [ray.cloudpickle.dumps(shipped) for _ in range(5)]
    assert _CountedFactory.pickled == 1
    first, second = (ray.cloudpickle.loads(data) for data in per_message[:2])
    assert first is second and first() == "the ClientApp"  # one factory per actor process
    assert len(per_message[0]) < 1024


def test_a_reply_whose_objects_never_come_fails_after_the_bound_not_flowers_two_hours():
    """What HttpGrid.pull_messages calls for each reply, for an object a dead site never sent."""
    import time

    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    def never_there(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    original = http_grid.pull_objects
    with compat.bounded_reply_downloads(0.3):
        started = time.monotonic()
        with pytest.raises(ObjectPullError):
            http_grid.pull_objects(object_ids=["a" * 64], pull_object_fn=never_there)
        assert time.monotonic() - started < 5  # unbounded: retries for PULL_MAX_TIME = 7200 s
    assert http_grid.pull_objects is original


def test_flowers_own_peers_are_reachable_for_the_benchmarks():
    """What the SecAgg benchmarks measure beside ours: Flower's Shamir and its SecAgg+ stack."""
    import os

    create_shares, combine_shares = compat.flower_shamir()
    secret = os.urandom(32)
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[:3]) == secret
    legacy = compat.flower_legacy_api()
    assert issubclass(legacy.SecAggPlusWorkflow, object) and callable(legacy.secaggplus_mod)
    assert legacy.FedAvg().__class__.__name__ == "FedAvg"


def test_the_simulated_link_state_registers_sites_as_the_engine_does_and_restores_identity():
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id
    with compat.simulated_link_state(5) as link:
        assert sorted(link.nodes.values()) == [0, 1, 2, 3, 4]
        assert link.state.get_nodes(link.run_id) == set(link.nodes)
        by_partition = sorted(link.nodes, key=link.nodes.get)
        assert len(link.push([by_partition[1]])) == 1
        assert link.deliver(1) == [by_partition[1]]  # Flower's own loop, unpatched
    assert TaskIdentity._run_id == before


# ---- Opacus ------------------------------------------------------------------------------------

def test_the_processed_flag_is_the_one_opacus_sets_and_checks():
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = data.tensors

    def backward():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    backward()
    optimizer.clip_and_accumulate()
    summed = optimizer.params[0].summed_grad
    compat.check_processed_flag(summed)  # fresh: passes
    compat.mark_as_processed(summed)
    with pytest.raises(ValueError, match="zero_grad"):  # Opacus's own noise step sees our mark
        optimizer.add_noise()
    backward()
    optimizer.step()  # Opacus's own step marks what our check sees
    with pytest.raises(ValueError, match="zero_grad"):
        compat.check_processed_flag(optimizer.params[0].summed_grad)


# ---- Ray ---------------------------------------------------------------------------------------

def test_ray_resolves_addresses_and_tells_a_gcs_from_another_grpc_server():
    import grpc
    from ray.exceptions import RpcError

    assert compat.ray_bootstrap_address("local") is None
    host, _, port = compat.ray_bootstrap_address("127.0.0.1:6379").rpartition(":")
    assert port == "6379" and host
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # answers, but no Ray GCS
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(RpcError, match="Method not found"):
            compat.ray_gcs_answers(f"127.0.0.1:{grpc_port}")
    finally:
        server.stop(None)


# ---- nothing else reaches into them ------------------------------------------------------------

def _private_imports(path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imports = [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imports = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in imports:
            root = module.split(".")[0]
            if root not in {"flwr", "ray", "opacus", "torch"}:
                continue
            private = (any(part.startswith("_") for part in module.split("."))
                       or name.startswith("_")
                       or (root == "flwr" and module not in FLOWER_PUBLIC))
            if private:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module} {name}".strip())
    return found


def test_only_compat_imports_private_internals_of_the_dependencies():
    offenders = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
                 if path != ROOT / "privacy" / "compat.py" for hit in _private_imports(path)]
    assert offenders == [], "use privacy/compat.py instead:\n" + "\n".join(offenders)


def test_the_scan_sees_the_internals_compat_uses():
    hits = _private_imports(ROOT / "privacy" / "compat.py")
    for internal in ("ray._private.services", "ray._raylet", "_check_processed_flag",
                     "flwr.supercore.inflatable", "flwr.server.superlink.fleet.vce",
                     "flwr.superlink.grid", "flwr.server.workflow",
                     "flwr.common.secure_aggregation"):
        assert any(re.search(re.escape(internal), hit) for hit in hits), internal
