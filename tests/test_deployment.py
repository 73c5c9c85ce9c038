"""Deployment across hospitals, end to end with real processes on loopback (docs/deploy.md).

One federation is started for the whole file (module fixture): provisioned keys and
certificates, a SuperLink with TLS and SuperNode authentication, four registered hospitals
with their own site configuration files, data folders, state directories and ports, and one
SuperNode whose key was never registered. A 2-round run of a release of the app with DP-SGD
and secure aggregation follows:

- ``hospital_a`` approved the release: it trains every round;
- ``hospital_b`` approved it but its privacy budget (max_epsilon in its site file) is too
  small: it declines, sending only its privacy ledger (a dropout to secure aggregation);
- ``hospital_c`` approved only an earlier release: it refuses, the report names it;
- ``hospital_d`` approved the release and trains in round 1; its SuperNode is killed
  (SIGKILL, the whole process group) once it has answered round 2's first stage: the round
  must not hang — it ends within the stage and round timeouts, with the reason in the report;
- ``intruder`` was provisioned but never registered: the SuperLink rejects it.

Then every site's egress log must account for exactly what the server received.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.approval import app_hash
from client.egress import EGRESS_LOG, read_log, summarize
from client.site import SiteConfigError, SiteSettings
from server.provision import provision
from server.settings import compose
from simulations.synthetic import get_generator
from tests.helpers import ROOT

SITES = ("hospital_a", "hospital_b", "hospital_c", "hospital_d")
KILLED = "hospital_d"
ROUNDS = 2
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode live here
# Run config the coordinator passes to `flwr run --run-config`. Flower accepts only keys declared
# in the app's [tool.flwr.app.config]; _release declares the ones this checkout lacks.
RELEASE_RUN_CONFIG = {"task": "tabular", "privacy": "dp", "secagg": "on", "min_sites": 1,
                      "local_epochs": 1,
                      # a lost site is waited for this long per secure stage / per message /
                      # for a reply it began to upload
                      # (generous for a loaded 2-core machine: a stage takes ~5 s, training
                      # 10-17 s here, 3x that with other jobs running)
                      "secagg.stage_timeout_s": 30, "simulation.round_timeout_s": 60,
                      "upload_timeout_s": 20}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _release(dest: Path) -> Path:
    """A release checkout of the app, as a coordinator would `flwr run` it."""
    for package in ("client", "server", "models", "privacy", "conf"):
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", ".*"))
    shutil.copy(ROOT / "README.md", dest / "README.md")
    text = (ROOT / "pyproject.toml").read_text()
    declared = tomllib.loads(text)["tool"]["flwr"]["app"].get("config", {})
    missing = "".join(f"{json.dumps(key)} = {json.dumps(value)}\n"
                      for key, value in RELEASE_RUN_CONFIG.items() if key not in declared)
    text = text.replace("[tool.flwr.app.config]\n", "[tool.flwr.app.config]\n" + missing, 1)
    (dest / "pyproject.toml").write_text(text)
    return dest


def _site_toml(template: Path, *, data: Path, state: Path, approved: str,
               max_epsilon: float) -> Path:
    """The hospital edits its provisioned template: its data, state, budget, approval."""
    text = template.read_text()
    for key, value in (("data_path", f'"{data}"'), ("state_dir", f'"{state}"'),
                       ("max_epsilon", str(max_epsilon)),
                       ("approved_app_hashes", f'["{approved}"]')):
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert count == 1, key
    template.write_text(text)
    return template


@dataclass
class Federation:
    root: Path
    release_hash: str
    old_hash: str
    seconds: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    run_output: str = ""
    intruder_rc: int | None = None
    intruder_log: str = ""
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    all_gone: dict[str, bool] = field(default_factory=dict)  # process group empty after stop
    logs: dict[str, str] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)

    def state(self, site: str) -> Path:
        return self.root / "state" / site

    def egress(self, site: str) -> list[dict]:
        return read_log(self.state(site) / EGRESS_LOG)


class Processes:
    """Every process the test starts, each in its own session, so that stopping one stops its
    children (SuperExec, ClientApps) too; whatever is left is killed at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, timeout: float = 20) -> tuple[int | None, bool]:
        """SIGTERM to the process (Flower shuts down cleanly on it), SIGKILL after ``timeout``.

        Returns the exit status and whether its whole process group (SuperExec, ClientApps)
        was gone within ``timeout`` as well.
        """
        proc = self.started[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return None, False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return proc.returncode, True
            time.sleep(0.2)
        return proc.returncode, False

    def kill_all(self) -> None:
        for proc in self.started.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: leftover children too
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.wait(10)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def _rounds_answered(log: Path) -> set[int]:
    """The rounds of the complete lines of a site's egress log, read while it is written."""
    text = log.read_text() if log.is_file() else ""
    return {json.loads(line)["round"] for line in text.splitlines(keepends=True)
            if line.endswith("\n") and line.strip()}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("federation")
    (root / "logs").mkdir()
    procs = Processes(root / "logs")
    link_port = _free_port()
    address = f"127.0.0.1:{link_port}"
    try:
        # Coordinator: provision the federation, start the SuperLink with TLS + node auth.
        pki = provision(root / "pki", [*SITES, "intruder"], address=address, task="tabular")
        link = pki.superlink_dir
        base_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONHASHSEED": "0"}
        coordinator_env = {**base_env, "FLWR_HOME": str(root / "coordinator")}
        (root / "coordinator").mkdir()
        (root / "coordinator" / "config.toml").write_text(
            '[superlink]\ndefault = "medsilo"\n\n' + (link / "connection.toml").read_text())
        superlink = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(link / "ca.crt"),
            "--ssl-certfile", str(link / "server.crt"), "--ssl-keyfile", str(link / "server.key"),
            "--enable-supernode-auth", "--port", str(link_port),
            "--disable-runtime-dependency-installation"], coordinator_env)

        # Meanwhile: the release, its hash, an older release's hash, each hospital's data.
        release = _release(root / "release")
        fed = Federation(root=root, release_hash=app_hash(release), old_hash=app_hash(ROOT))
        task_cfg = compose(["task=tabular"])["task"]
        task_cfg["synthetic"] = {**task_cfg["synthetic"], "train_size": 120, "test_size": 40}
        generator = get_generator("tabular")
        for site, profile in zip(SITES, generator.site_profiles(task_cfg, len(SITES), 0)):
            generator.generate_site(root / "data" / site, task_cfg, profile, 0)
        approvals = {"hospital_a": (fed.release_hash, 100.0),
                     "hospital_b": (fed.release_hash, 0.05),  # budget too small: declines
                     "hospital_c": (fed.old_hash, 100.0),  # approved another version: refuses
                     KILLED: (fed.release_hash, 100.0)}
        for site, (approved, budget) in approvals.items():
            _site_toml(pki.site_dir(site) / "site.toml", data=root / "data" / site,
                       state=fed.state(site), approved=approved, max_epsilon=budget)
        _wait_for_port(link_port, superlink)

        # Coordinator: register each hospital's public key (never the intruder's).
        registering = {site: subprocess.Popen(
            [str(BIN / "flwr"), "supernode", "register", str(pki.site_dir(site) / "supernode.pub"),
             "medsilo", "--format", "json"], env=coordinator_env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for site in SITES}
        for site, proc in registering.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            fed.registered[site] = json.loads(out[out.index("{"):])["node-id"]
        fed.seconds["coordinator_ready"] = time.perf_counter() - started

        # Each hospital: a SuperNode with its bundle and its site configuration file.
        for site in (*SITES, "intruder"):
            bundle = pki.site_dir(site)
            (root / "homes" / site).mkdir(parents=True)
            procs.start(site, [
                str(BIN / "flower-supernode"), "--superlink", address,
                "--root-certificates", str(bundle / "ca.crt"),
                "--auth-supernode-private-key", str(bundle / "supernode.key"),
                "--port", str(_free_port()),
                "--node-config", f'site-config="{bundle / "site.toml"}"',
            ], {**base_env, "FLWR_HOME": str(root / "homes" / site)})

        # Coordinator: run the release for 2 rounds; --stream returns when the run ends.
        report_dir = root / "report"
        run_started = time.perf_counter()
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(release), "medsilo", "--stream", "--run-config",
             f'rounds={ROUNDS} num_hospitals={len(SITES)} report_dir="{report_dir}" ' + " ".join(
                 # a dotted key is quoted: `secagg="on" secagg.x=1` would be a TOML conflict
                 f"{json.dumps(key) if '.' in key else key}={json.dumps(value)}"
                 for key, value in RELEASE_RUN_CONFIG.items())],
            env=coordinator_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Meanwhile, one hospital is lost: once it has answered round 2's first stage, its
        # SuperNode and every child of it are killed, as a power cut would.
        while ROUNDS not in _rounds_answered(fed.state(KILLED) / EGRESS_LOG):
            if run.poll() is not None or time.perf_counter() - run_started > 400:
                run.kill()
                pytest.fail(f"the run ended before round {ROUNDS} reached {KILLED}: "
                            + run.communicate()[0][-4000:] + procs.log("superlink")[-4000:])
            time.sleep(0.5)
        os.killpg(procs.started[KILLED].pid, signal.SIGKILL)
        fed.seconds["killed_at"] = time.perf_counter() - run_started
        try:
            out, _ = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
        fed.seconds["flwr_run"] = time.perf_counter() - run_started
        (root / "logs" / "flwr-run.log").write_text(out)  # the ServerApp's log (--stream)
        fed.run_output = out[-6000:]
        assert run.returncode == 0, fed.run_output
        deadline = time.monotonic() + 60
        while not (report_dir / "report.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (report_dir / "report.json").is_file(), (
            fed.run_output + procs.log("superlink")[-4000:])
        fed.report = json.loads((report_dir / "report.json").read_text())

        intruder = procs.started["intruder"]
        fed.intruder_rc = intruder.wait(60)
        fed.intruder_log = procs.log("intruder")
        for name in (*SITES, "superlink"):
            if name != KILLED:
                fed.exit_codes[name], fed.all_gone[name] = procs.stop(name)
            fed.logs[name] = procs.log(name)
        fed.seconds["total"] = time.perf_counter() - started
        print(f"\nfederation timings (s): {fed.seconds}")
        yield fed
    finally:
        procs.kill_all()


@pytest.mark.slow
@pytest.mark.deployment
def test_the_run_trains_securely_with_the_sites_that_accept_it(federation):
    report = federation.report
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    assert report["run"]["stopped_early"] is None and report["run"]["privacy"] == "dp"
    assert report["run"]["task"] == "tabular"
    first = report["rounds"][0]
    # hospital_c refused, so keys were agreed again among a, b, d (threshold 2 of 3): b's
    # decline is a dropout the others' shares recover, and a and d are aggregated
    assert set(first["train"]) == {"hospital_a", KILLED}, first
    secure = first["secure_aggregation"]
    assert secure["aggregated"] == ["hospital_a", KILLED] and secure["dropped"] == ["hospital_b"]
    assert secure["aborted"] is None and not first["failures"] and not first["timed_out"]
    assert set(first["sites"]) == {"hospital_a", "hospital_b", KILLED}  # evaluated on their data
    assert report["privacy"]["hospital_a"]["rounds_trained"] >= 1


@pytest.mark.slow
@pytest.mark.deployment
def test_a_site_lost_in_round_2_costs_the_round_not_the_run(federation):
    """hospital_d is killed once it has answered round 2's first stage: the round ends within
    the timeouts (no wait for it is unbounded), aborted with the reason, and the run finishes."""
    report, lost = federation.report, federation.registered[KILLED]
    second = report["rounds"][1]
    # a may have trained (its ledger counts it), but nothing was aggregated or revealed
    assert second["secure_aggregation"]["aggregated"] == []
    assert second["secure_aggregation"]["update_norm"] is None
    reason = second["secure_aggregation"]["aborted"]
    assert reason and reason.startswith("secure aggregation aborted at stage"), second
    assert "secure aggregation aborted" in second["skipped"]
    # the lost site is named: it missed a stage, or its half-uploaded reply failed
    assert KILLED in second["timed_out"] or any(
        f["node_id"] == lost for f in second["failures"]), second
    assert set(second["sites"]) == {"hospital_a", "hospital_b"}
    # Flower's own "Node Unavailable" replies for it name it, not the SuperLink (node 1)
    assert all(f["node_id"] != 1 for r in report["rounds"] for f in r["failures"])
    after_kill = federation.seconds["flwr_run"] - federation.seconds["killed_at"]
    # stage timeout 30 s (twice at most: the key stage and its re-agreement), upload 20 s,
    # evaluation 60 s, and the survivors' own stages
    assert after_kill < 240, federation.seconds
    md = (federation.root / "report" / "report.md").read_text()
    assert "secure aggregation aborted" in md


@pytest.mark.slow
@pytest.mark.deployment
def test_a_site_that_did_not_approve_this_app_refuses_and_the_report_names_it(federation):
    assert federation.release_hash != federation.old_hash
    for rnd in federation.report["rounds"]:
        reason = rnd["refused"]["hospital_c"]
        assert federation.release_hash in reason and "not approved" in reason
        assert set(rnd["refused"]) == {"hospital_c"}
    md = (federation.root / "report" / "report.md").read_text()
    assert "refused: hospital_c (app " in md


@pytest.mark.slow
@pytest.mark.deployment
def test_a_site_over_its_own_budget_declines(federation):
    rounds = federation.report["rounds"]
    assert "hospital_b" in rounds[0]["declined"]  # round 2 may abort before anyone trains
    for rnd in rounds:
        assert "max_epsilon=0.05" in rnd["declined"].get("hospital_b", "max_epsilon=0.05")
    assert federation.report["privacy"]["hospital_b"]["rounds_trained"] == 0


@pytest.mark.slow
@pytest.mark.deployment
def test_a_supernode_with_an_unregistered_key_is_rejected(federation):
    # Flower 1.41: the SuperLink refuses to activate the node; flower-supernode logs its exit
    # code 305 (SUPERNODE_CONNECTION_ERROR) but, like every Flower error exit, the process
    # status is 1 (flwr.supercore.exit.flwr_exit maps codes >= 100 to 1).
    assert federation.intruder_rc == 1, federation.intruder_log[-2000:]
    assert "Exit Code: 305" in federation.intruder_log
    assert "Failed to activate SuperNode" in federation.intruder_log
    assert "intruder" not in federation.report["rounds"][0]["received"]


@pytest.mark.slow
@pytest.mark.deployment
def test_every_process_exits_cleanly_on_sigterm(federation):
    running = [site for site in SITES if site != KILLED]
    assert federation.all_gone == {name: True for name in (*running, "superlink")}
    for site in running:
        assert federation.exit_codes[site] == 0
        assert "SuperNode terminated gracefully" in federation.logs[site]
    # The SuperLink shuts down gracefully, then uvicorn re-raises the SIGTERM it caught so the
    # process ends "killed by SIGTERM" (status -15), as servers under systemd are expected to.
    assert federation.exit_codes["superlink"] == -signal.SIGTERM
    assert "Application shutdown complete" in federation.logs["superlink"]
    assert "SuperExec terminated gracefully" in federation.logs["superlink"]


@pytest.mark.slow
@pytest.mark.deployment
def test_every_message_is_answered_by_one_clientapp_process_without_restarts(federation):
    """Under load, Flower restarts a ClientApp whose task token expired: 30 s from the claim to
    its first call, 60 s without a heartbeat (flwr.common.constant HEARTBEAT_*). Five SuperNodes
    on this machine's cores, one process per message: none may need a second try."""
    for site in SITES:
        if site == KILLED:
            continue
        log = federation.logs[site]
        starts = log.count("Start `flwr-clientapp` process")
        assert starts == len(federation.egress(site)), site
        assert "authentication failed" not in log and " 401" not in log, site


@pytest.mark.slow
@pytest.mark.deployment
def test_each_egress_log_accounts_for_exactly_what_the_server_received(federation):
    rounds = {r["round"]: r for r in federation.report["rounds"]}
    for site in SITES:
        entries = federation.egress(site)
        assert {e["site"] for e in entries} == {site}
        assert len({e["run_id"] for e in entries}) == 1
        assert {e["round"] for e in entries} <= set(rounds)  # every stage names its round
        for entry in entries:
            # the content the server received is the content the site logged, byte for byte
            # (the report keeps the id of each site's masked update and evaluation reply)
            stage = {"evaluate": "evaluate", "masked-update": "train"}.get(entry["kind"])
            if stage is not None:
                assert entry["sha256"] == rounds[entry["round"]]["received"][site][stage]
            # the total adds the RecordDict's own object (the record names and ids) to the records
            assert entry["bytes"] > sum(entry["records"].values()) > 0
        # under secure aggregation no site's model update ever leaves in the clear
        assert "update" not in {e["kind"] for e in entries}, site
    kinds = [e["kind"] for e in federation.egress("hospital_a") if e["round"] == 1]
    assert kinds == ["secagg-keys", "secagg-keys", "secagg-shares", "masked-update",
                     "secagg-consistency", "secagg-unmask", "metrics"]  # keys agreed twice
    declined = [e for e in federation.egress("hospital_b") if e["round"] == 1]
    assert "privacy-ledger" in {e["kind"] for e in declined}  # its decline: a ledger, no model
    refusals = federation.egress("hospital_c")
    assert {e["kind"] for e in refusals} == {"refusal"}
    assert all(set(e["records"]) == {"metrics", "site"} for e in refusals)  # no model, no data


@pytest.mark.slow
@pytest.mark.deployment
def test_the_privacy_officer_summary_counts_messages_bytes_kinds_and_rounds(federation):
    log = federation.state("hospital_a") / EGRESS_LOG
    proc = subprocess.run([sys.executable, "-m", "client.egress", "summarize", str(log),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    entries = federation.egress("hospital_a")
    assert summary == json.loads(json.dumps(summarize(entries)))
    (run,) = summary["runs"].values()
    assert run["messages"] == len(entries) and run["rounds"] == list(range(1, ROUNDS + 1))
    assert run["kinds"] == dict(Counter(e["kind"] for e in entries))
    assert run["kinds"]["masked-update"] >= 1 and run["kinds"]["metrics"] == ROUNDS
    assert summary["bytes"] == sum(e["bytes"] for e in entries)
    print("\negress log sizes (bytes on disk): " + ", ".join(
        f"{s}: {(federation.state(s) / EGRESS_LOG).stat().st_size}" for s in SITES))


# --- the site configuration file (fast, no processes) ---------------------------------------


def test_the_site_file_wins_and_approval_is_on_by_default(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(f'site_id = "h1"\ntask = "tabular"\ndata_path = "{tmp_path}"\n'
                    f'state_dir = "{tmp_path / "state"}"\nmax_epsilon = 3.0\ndelta = 1e-6\n'
                    f'approved_app_hashes = ["{"a" * 64}"]\n')
    site = SiteSettings.from_node_config({"site-config": str(path)})
    assert (site.site_id, site.task, site.max_epsilon, site.delta) == ("h1", "tabular", 3.0, 1e-6)
    assert site.require_approval and site.approved_app_hashes == ("a" * 64,)
    assert site.state_dir == tmp_path / "state"
    # node config keys still work without a file, and approval is on there too
    legacy = SiteSettings.from_node_config({"data-path": str(tmp_path), "max-epsilon": 8})
    assert legacy.require_approval and legacy.max_epsilon == 8.0
    # the in-process simulation turns approval off explicitly
    assert not SiteSettings.from_node_config({"data-path": "x"}, simulation=True).require_approval


@pytest.mark.parametrize(("content", "message"), [
    ('data_path = "/d"\nmax_epsilon = "lots"\n', "max-epsilon must be a number"),
    ('data_path = "/d"\napproved_app_hashes = ["abc"]\n', "expected 64 hex digits"),
    ('data_path = "/d"\nbudget = 3\n', r"unknown key\(s\) \['budget'\]"),
    ('task = "tabular"\n', "'data_path' .* is required"),
    ('data_path = "/d"\nrequire_approval = "maybe"\n', "require-approval must be true or false"),
    ("data_path = \n", "not valid TOML"),
])
def test_a_bad_site_file_names_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "site.toml"
    path.write_text(content)
    with pytest.raises(SiteConfigError, match=message) as err:
        SiteSettings.from_file(path)
    assert str(path) in str(err.value)


def test_a_node_config_names_the_file_or_the_keys_not_both(tmp_path):
    with pytest.raises(SiteConfigError, match=r"also sets \['data-path'\]"):
        SiteSettings.from_node_config({"site-config": "/x.toml", "data-path": "/d"})
    with pytest.raises(SiteConfigError, match="does not exist"):
        SiteSettings.from_node_config({"site-config": str(tmp_path / "missing.toml")})


# --- the app hash a site approves (fast, no processes) --------------------------------------


def test_an_admin_computes_from_a_checkout_the_hash_the_running_app_computes_from_its_fab(
        tmp_path):
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    proc = subprocess.run([sys.executable, "-m", "client.approval", "hash", str(ROOT)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == app_hash(ROOT) and re.fullmatch(r"[0-9a-f]{64}\n",
                                                                   proc.stdout)
    # Flower rewrites pyproject.toml inside the FAB; the hash covers its parsed content
    zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).extractall(tmp_path / "installed")
    assert app_hash(tmp_path / "installed") == app_hash(ROOT)


def test_the_hash_changes_with_the_code_and_config_only(tmp_path):
    release = _release(tmp_path / "release")
    original = app_hash(release)
    (release / "client" / "__pycache__").mkdir(exist_ok=True)
    (release / "client" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (release / "client" / "test_local.py").write_text("assert True\n")
    (release / "NOTES.md").write_text("not code\n")
    pyproject = release / "pyproject.toml"
    pyproject.write_text("# a comment Flower drops from the FAB\n" + pyproject.read_text())
    assert app_hash(release) == original
    (release / "conf" / "privacy" / "dp.yaml").write_text(
        (release / "conf" / "privacy" / "dp.yaml").read_text().replace(
            "max_grad_norm: 1.0", "max_grad_norm: 10.0"))
    assert app_hash(release) != original
    proc = subprocess.run([sys.executable, "-m", "client.approval", "hash",
                           str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "is not a medsilo app root" in proc.stderr
