"""Ctrl-C and SIGTERM on ``python -m simulations.run``: a clean stop within 15 s, the shell's exit
status for the signal, the last complete round checkpointed and resumable, no process left.

The signal goes to the run's whole process group, as a terminal's Ctrl-C does (Ray's processes
are in it). What the round loop does on a stop is tested in-process
(tests/test_rounds_in_process.py); this is the engine, the signal handling and the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

RUN = ("task=tabular", "num_hospitals=3", "task.synthetic.train_size=60",
       "task.synthetic.test_size=30", "local_epochs=1", "baselines=none", "device=cpu")
STOP_WITHIN_S = 15
ROUNDS = 6


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie, killed but not yet reaped by an
    init that may never reap it in a container, does not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp, ...
            return True
    return False


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={out}", *RUN, *overrides],
        cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own process group


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_simulation_cleanly_and_resume_finishes_it(tmp_path, signum, status):
    out = tmp_path / "run"
    proc = _start(out, f"rounds={ROUNDS}")
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.npz").is_file():  # round 1 is complete
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no round completed in 240 s"
            time.sleep(0.2)
        sent = time.monotonic()
        os.killpg(proc.pid, signum)  # the whole group, as a terminal's Ctrl-C
        output, _ = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - sent
        # nothing of the run is left: no Ray worker, raylet or GCS server
        while _group_alive(proc.pid) and time.monotonic() - sent < STOP_WITHIN_S:
            time.sleep(0.2)
        gone_after = time.monotonic() - sent
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"\n{signal.Signals(signum).name}: exit after {stopped_after:.1f} s, "
          f"process group gone after {gone_after:.1f} s")
    assert proc.returncode == status, output[-3000:]
    assert stopped_after <= STOP_WITHIN_S and gone_after <= STOP_WITHIN_S, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    report = json.loads((out / "report.json").read_text())
    done = [r["round"] for r in report["rounds"]]
    assert done and done == list(range(1, len(done) + 1)) and len(done) < ROUNDS
    name = signal.Signals(signum).name
    assert report["run"]["stopped_early"].startswith(f"stopped by {name} during round "
                                                     f"{len(done) + 1};")
    assert "continue with:" in output and f"resume={out}" in output
    if signum != signal.SIGINT:
        return  # resuming is the same after either signal: once is enough (the suite's time)

    # the printed command continues the run
    finish = _start(tmp_path / "ignored", f"rounds={ROUNDS}", f"resume={out}")
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    assert report["run"]["stopped_early"] is None
