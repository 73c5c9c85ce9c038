"""The main job on an existing Ray cluster (docs/ray_cluster.md), tested with a one-machine
cluster: a head started here with the venv's ``ray start --head``, as on a cluster's first node.

The head is stopped by killing its own process group, never with ``ray stop``: that kills every
Ray process of the user on the machine, other runs' included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.settings import ConfigError, compose
from simulations.engine import run_in_process
from tests.helpers import ROOT, run_simulation_cli

RAY_CLI = Path(sys.executable).with_name("ray")
TINY = ("task=tabular", "num_hospitals=2", "rounds=1", "task.synthetic.train_size=60",
        "task.synthetic.test_size=30", "baselines=none")
HEAD_START_TIMEOUT_S = 60


@dataclass(frozen=True)
class RayHead:
    address: str
    client_port: int  # Ray Client's gRPC server: a port that answers but is no GCS
    session_logs: Path  # the head's own logs: one worker log per Ray worker it started

    def site_actors_started(self) -> int:
        """Ray workers on this head that became Flower's ClientAppActor (a simulated site's
        runner); Ray writes the actor's class name into the worker's output at creation."""
        return sum("ClientAppActor" in log.read_text(errors="replace")
                   for log in self.session_logs.glob("worker-*.out"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # a short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes;
    # its own temp dir also keeps this head out of /tmp/ray, where other runs look for clusters
    temp_dir = Path(tempfile.mkdtemp(prefix="medsilo-ray-", dir="/tmp"))
    port, client_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(temp_dir / "head.log", "wb") as head_log:
        head = subprocess.Popen(
            [str(RAY_CLI), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", f"--dashboard-port={_free_port()}",
             f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"],
            stdout=head_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True,  # the head's daemons share this process group: stop = kill it
        )
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in (temp_dir / "head.log").read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, (
                "`ray start --head` did not start:\n" + (temp_dir / "head.log").read_text())
            time.sleep(0.2)
        sessions = list(temp_dir.glob("session_2*"))
        assert len(sessions) == 1, sessions
        yield RayHead(address=f"127.0.0.1:{port}", client_port=client_port,
                      session_logs=sessions[0] / "logs")
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever survived (a worker mid-start, a wedged raylet)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_the_main_job_runs_its_sites_on_an_existing_cluster(ray_head, tmp_path):
    before = ray_head.site_actors_started()
    report = run_simulation_cli(tmp_path / "cluster", *TINY,
                                f"simulation.ray_address={ray_head.address}")
    # the head has 2 CPUs and a site needs 1: Flower's pool puts 2 site actors on it
    assert ray_head.site_actors_started() - before == 2
    # where the sites run changes nothing else: the same seed on a private local Ray instance
    # trains and evaluates to the same metrics, site by site
    local = run_simulation_cli(tmp_path / "local", *TINY)
    assert ray_head.site_actors_started() - before == 2  # the local run stayed off the cluster
    assert len(report["rounds"]) == 1
    assert report["final"] == local["final"]
    assert report["rounds"][0]["train"] == local["rounds"][0]["train"]


def test_without_an_address_a_run_asks_ray_for_a_private_instance():
    # ray.init(address=None) would join the cluster named by RAY_ADDRESS or the last
    # `ray start` head on this machine; "local" always starts a new instance. (An end-to-end run
    # beside the head with RAY_ADDRESS set, measured once: the head's actor count unchanged;
    # left out of the suite for its 20 s.)
    from simulations.engine import _ray_init_args

    assert _ray_init_args(None, None) == {"address": "local"}
    assert _ray_init_args(None, 512)["object_store_memory"] == 512 * 1024 * 1024


@pytest.mark.slow
def test_an_address_where_no_cluster_answers_fails_fast_naming_the_key(tmp_path):
    # ray.init itself retries such an address for minutes (measured: over 5 min)
    closed_port = _free_port()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={tmp_path}", *TINY,
         f"simulation.ray_address=127.0.0.1:{closed_port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "simulation.ray_address='127.0.0.1:" in proc.stderr
    assert "ray start --head" in proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "report.json").exists()


def test_an_object_store_size_is_refused_for_a_cluster_whose_nodes_fix_it():
    # refused with the configuration, before any data is written or Ray starts
    with pytest.raises(ConfigError, match="simulation.object_store_mb must be null with "
                                          "simulation.ray_address .*`ray start "
                                          "--object-store-memory"):
        compose(["simulation.ray_address=127.0.0.1:6379", "simulation.object_store_mb=512"])


def test_a_ray_client_address_is_refused_with_the_address_form_expected():
    with pytest.raises(ConfigError, match="simulation.ray_address must be .*HOST:PORT"):
        compose(["simulation.ray_address=ray://10.0.0.5:10001"])


@pytest.mark.slow
def test_a_port_that_answers_but_is_no_ray_head_is_refused_in_seconds(ray_head):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="simulation.ray_address=.* is no Ray cluster's head"):
        run_in_process(None, None, 2, client_cpus=1.0, client_gpus=0.0,  # type: ignore[arg-type]
                       ray_address=f"127.0.0.1:{ray_head.client_port}")
    assert time.monotonic() - started < 10
