"""Many simulated hospitals on one machine: round time, memory and start-up as sites grow.

    python -m simulations.benchmarks.many_sites [--sites 10 100 1000] [--sites-per-round 10]
        [--rounds 3] [--task tabular] [--repeats 3] [--no-stock] [--json PATH] [--keep-dir DIR]
        [key=value ...]

For each number of hospitals N: ``python -m simulations.run task=<task> num_hospitals=N
sites_per_round=K rounds=R`` in a subprocess, with a fresh data cache, so time to first round
includes writing the synthetic sites the run needs before round 1 (with the default
``data.generate=on_first_use``: the pooled-evaluation sample; the others as they are sampled).
Extra ``key=value`` arguments are passed to every run
(e.g. ``model=logreg local_epochs=1``). Measured per N:

- time to first round: ``rounds[0].started_at`` in the run's report.json minus the moment the
  subprocess was launched (interpreter start, Hydra, site data, Ray start-up);
- to header: launch until the run prints its header line, which ``simulations/run.py`` prints
  once it knows its site folders (start-up; before Ray starts);
- data generation, cold: ``simulations.sites.site_folders`` alone (every site written, as
  ``data.generate=upfront`` would), timed inside a separate process with its own empty cache;
- median round: median of ``rounds[].duration_s`` over rounds 2 .. R-1. The first round is shown
  apart because it also pays for starting Ray's ClientApp actors (a worker process each, importing
  torch: tens of seconds here, against about a second for a later round); the last round is shown
  apart because its evaluation asks every site, not only the sampled ones. With ``--rounds 2``
  there is no middle round and the median is the first round's time (marked in the JSON);
- peak RSS of the process tree: every ``--poll-s`` the benchmark walks /proc for the run and all
  its descendants (Ray's gcs_server, raylet, workers), sums VmRSS and keeps the largest sum. Pages
  shared between processes (Ray's object store, shared libraries) are counted once per process
  that maps them, so this over-counts; the private part (sum of RssAnon) is reported too;
- object store: Ray keeps it in a /dev/shm file that it unlinks and holds open; its allocated
  size (fstat of that descriptor, deduplicated by inode) is the shared memory the run uses.

Flower stock, measured in the same run (``--no-stock`` skips it): ``flwr.simulation.run_simulation``
with N virtual SuperNodes, Flower's own ``FedAvg`` (``flwr.serverapp.strategy``) sampling K of them
a round, and a ClientApp training an MLP of our model's shape on random tensors of a synthetic
site's size (the same batch size, epochs, optimizer and client_cpus; nothing of medsilo runs).
It is timed the same way: launch of its subprocess until round 1 starts (when FedAvg configures
round 1's training), then each round until the next starts. Our runs and stock's alternate
(ours first in even repeats, stock first in odd ones), ``--repeats`` times at each N; timings are
the median (and min) over the repeats, memory the largest. What ours pays before round 1 and
stock does not: Hydra (two composes and our validation) and our own modules' imports; the
pooled test set's initial evaluation (the pool's synthetic sites written and read, scikit-learn
imported) runs while round 1's sites train (server/rounds.py), so it counts in round 1's end,
not its start; stock's ClientApp imports only torch in its actors. Both start the ServerApp
while Ray starts (Flower's run_simulation; ours runs it on a thread, simulations/engine.py), so
round 1 carries Ray's and the actors' start-up in both: launch to the end of round 1 is shown
beside launch to its start. A steady round of ours also evaluates the global model on the pooled
test set, which stock does not.

Ratio: median round at N divided by the median round at the smallest N. Targets: peak RSS of
the tree at the largest N <= 2560 MB (issue 18's 2.5 GB at 1000 hospitals; issue 9 had 4 GB),
and ratio <= 2 at every N (issue 9). The sites trained per round (from report.json) are printed
so that a run in which every site trains (no sampling) is visible as such. Target (issue 18):
time to first round <= 1.5x Flower stock's at every N, to round 1's start and to its end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from simulations.benchmarks.flower_stock import STOCK_MARK
from simulations.engine import children_by_parent

RSS_TARGET_MB = 2560  # issue 18: 2.5 GB at 1000 hospitals
RATIO_TARGET = 2.0
STOCK_RATIO_TARGET = 1.5  # time to first round, ours / Flower stock's
# keys this script sets itself, and the flag a user gives instead
OWN_KEYS = {"task": "--task", "num_hospitals": "--sites", "sites_per_round": "--sites-per-round",
            "rounds": "--rounds", "hydra.run.dir": "--keep-dir", "data.cache_dir": "--keep-dir"}
HEADER_MARK = " hospitals · "  # simulations/run.py's first line, once the site folders are known
STDERR_TAIL_LINES = 30

console = Console(stderr=True)


# --- the process tree, read from /proc ----------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started: tells a process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _memory_kb(pid: int) -> dict[str, int]:
    wanted = {"VmRSS", "RssAnon", "RssShmem"}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in wanted:
                    out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _shm_files(pid: int) -> dict[tuple[int, int], int]:
    """(device, inode) -> allocated bytes of every /dev/shm file ``pid`` holds open, deleted or
    not (Ray's object store is an unlinked /dev/shm file that the raylet keeps open)."""
    files = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return files
    for fd in fds:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                continue
            info = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        files[(info.st_dev, info.st_ino)] = info.st_blocks * 512
    return files


class TreeMemory:
    """Largest memory of a process and all its descendants, sampled by ``poll``.

    A process stays counted after its parent exits (Ray's workers outlive the raylet by a moment
    at shutdown) for as long as it lives; the start time guards against a reused pid."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.members: dict[int, int | None] = {root: _start_time(root)}
        self.peak_rss_kb = self.peak_anon_kb = self.peak_shm_bytes = self.peak_processes = 0
        self.polls = 0

    def poll(self, *, with_shm: bool) -> None:
        self.polls += 1
        children = children_by_parent()
        pending = list(self.members)
        while pending:  # newly born descendants of any member
            for child in children.get(pending.pop(), []):
                if child not in self.members:
                    self.members[child] = _start_time(child)
                    pending.append(child)
        alive = {pid: started for pid, started in self.members.items()
                 if started is not None and _start_time(pid) == started}
        self.members = alive
        rss = anon = 0
        shm: dict[tuple[int, int], int] = {}
        for pid in alive:
            memory = _memory_kb(pid)
            rss += memory.get("VmRSS", 0)
            anon += memory.get("RssAnon", 0)
            if with_shm:
                shm.update(_shm_files(pid))
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_anon_kb = max(self.peak_anon_kb, anon)
        self.peak_processes = max(self.peak_processes, len(alive))
        if with_shm:
            self.peak_shm_bytes = max(self.peak_shm_bytes, sum(shm.values()))

    def terminate(self) -> None:
        """End the run and every descendant still alive (all started by this benchmark)."""
        for pid, started in self.members.items():
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --- one run ------------------------------------------------------------------------------------

def _stamped_lines(stream, lines: list[tuple[float, str]], on_line: Callable[[str], None]) -> None:
    for line in stream:
        lines.append((time.time(), line.rstrip("\n")))
        on_line(line)


def data_generation_s(task: str, sites: int, overrides: list[str], cache_dir: Path) -> float:
    """Cold ``site_folders`` alone, timed inside its own process (imports excluded)."""
    code = ("import json, sys, time\n"
            "from server.settings import compose\n"
            "from simulations.sites import site_folders\n"
            "cfg = compose(json.loads(sys.argv[1]))\n"
            "started = time.perf_counter()\n"
            "site_folders(cfg)\n"
            "print(time.perf_counter() - started)\n")
    keys = [f"task={task}", f"num_hospitals={sites}", f"data.cache_dir={cache_dir}",
            *(o for o in overrides if not o.lstrip("+~").startswith("hydra."))]
    done = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError("data generation failed:\n" + done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def _median_round(durations: list[float]) -> tuple[float | None, str]:
    """Median of the rounds between the first (actor start-up) and the last (every site
    evaluates), and which rounds it covers."""
    if len(durations) >= 3:
        return statistics.median(durations[1:-1]), f"rounds 2..{len(durations) - 1}"
    if len(durations) == 2:
        return durations[0], "round 1 only (includes actor start-up)"
    return None, "none"


def _run_watched(command: list[str], args: argparse.Namespace, row: dict[str, Any],
                 on_line: Callable[[str], None]) -> tuple[int | None, list[tuple[float, str]],
                                                          float]:
    """Run ``command``, sampling the memory of its process tree into ``row``; returns its exit
    code, its stderr lines stamped with wall-clock time, and the wall-clock time of its launch."""
    lines: list[tuple[float, str]] = []
    launched_at, launched = time.time(), time.perf_counter()
    # stdout is not read: our run and the stock one write progress and results to stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reader = threading.Thread(target=_stamped_lines, args=(proc.stderr, lines, on_line),
                              daemon=True)
    reader.start()
    tree = TreeMemory(proc.pid)
    try:
        while proc.poll() is None:
            tree.poll(with_shm=tree.polls % args.shm_every == 0)
            if time.perf_counter() - launched > args.timeout_s:
                tree.terminate()
                row["status"] = f"failed: killed after the {args.timeout_s:.0f} s timeout"
                break
            time.sleep(args.poll_s)
    except BaseException:  # Ctrl-C: leave no Ray processes behind
        tree.terminate()
        raise
    proc.wait()
    reader.join(timeout=10)
    row["total_wall_s"] = round(time.perf_counter() - launched, 2)
    row["peak_rss_tree_mb"] = round(tree.peak_rss_kb / 1024, 1)
    row["peak_private_rss_mb"] = round(tree.peak_anon_kb / 1024, 1)
    row["peak_object_store_mb"] = round(tree.peak_shm_bytes / 2**20, 3)
    row["peak_processes"] = tree.peak_processes
    if proc.returncode != 0 and row["status"] == "ok":
        row["status"] = f"failed: exit code {proc.returncode}"
    return proc.returncode, lines, launched_at


def _round_times(row: dict[str, Any], started_at: list[float], durations: list[float],
                 launched_at: float) -> None:
    """Time to first round, round 1 (actor start-up) and the median steady round, into ``row``."""
    row["round_s"] = [round(d, 3) for d in durations]
    row["time_to_first_round_s"] = (round(started_at[0] - launched_at, 2) if started_at
                                    else None)
    median, row["median_covers"] = _median_round(durations)
    row["median_round_s"] = round(median, 3) if median is not None else None
    row["first_round_s"] = row["round_s"][0] if durations else None
    row["last_round_s"] = row["round_s"][-1] if durations else None
    row["to_first_round_end_s"] = (round(row["time_to_first_round_s"] + durations[0], 2)
                                   if started_at and durations else None)


def run_sites(sites: int, args: argparse.Namespace, overrides: list[str], work: Path,
              progress: Progress, bar, *, repeat: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {"num_hospitals": sites, "sites_per_round": args.sites_per_round,
                           "rounds": args.rounds, "status": "ok", "repeat": repeat}
    if repeat == 0:  # a separate measurement: once per N
        progress.update(bar, description=f"N={sites}: data generation alone (cold)")
        try:
            row["data_generation_s"] = round(
                data_generation_s(args.task, sites, overrides, work / f"cache-datagen-{sites}"), 2)
        except RuntimeError as err:
            row["data_generation_s"] = None
            row["data_generation_error"] = str(err)
        if not args.keep_dir:  # its only purpose was the timing
            shutil.rmtree(work / f"cache-datagen-{sites}", ignore_errors=True)

    # a fresh data cache each time: time to first round includes writing the sites
    run_dir, cache_dir = work / f"run-{sites}-{repeat}", work / f"cache-{sites}-{repeat}"
    command = [sys.executable, "-m", "simulations.run", f"task={args.task}",
               f"num_hospitals={sites}", f"sites_per_round={args.sites_per_round}",
               f"rounds={args.rounds}", f"hydra.run.dir={run_dir}",
               f"data.cache_dir={cache_dir}", *overrides]
    row["command"] = " ".join(command[1:])

    def on_line(line: str) -> None:
        if HEADER_MARK in line:
            progress.update(bar, description=f"N={sites}: sites written, starting Ray")
        elif line.startswith("round "):
            progress.update(bar, description=f"N={sites}: {line.split(':')[0]} of {args.rounds}"
                            " done")

    progress.update(bar, description=f"N={sites}: ours, repeat {repeat + 1} (fresh cache)")
    returncode, lines, launched_at = _run_watched(command, args, row, on_line)
    header = [t for t, line in lines if HEADER_MARK in line]
    row["to_header_s"] = round(header[0] - launched_at, 2) if header else None

    report_path = run_dir / "report.json"
    if returncode != 0 or not report_path.is_file():
        if row["status"] == "ok":
            row["status"] = "failed: no report.json"
        row["stderr_tail"] = [line for _, line in lines[-STDERR_TAIL_LINES:]]
        return row
    report = json.loads(report_path.read_text())
    # each round's wall time and start, as the run's own round loop measured them
    _round_times(row, [r["started_at"] for r in report["rounds"]],
                 [float(r["duration_s"]) for r in report["rounds"]], launched_at)
    trained = [len(r.get("train", {})) for r in report.get("rounds", [])]
    row["trained_per_round"] = trained
    row["asked_per_round"] = [r.get("asked") for r in report.get("rounds", [])]
    row["run_duration_s"] = report.get("run", {}).get("duration_s")
    return row


# --- Flower stock: the same shape of federation, nothing of medsilo -----------------------------

def stock_spec(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any] | str:
    """What the stock run needs from our configuration (model shape, site size, training), or
    why it cannot be built: it trains an MLP, so only a task with a feature vector and mlp."""
    from server.settings import compose  # Hydra only: the benchmark itself stays light

    cfg = compose([f"task={args.task}", f"num_hospitals={min(args.sites)}",
                   f"sites_per_round={args.sites_per_round}", f"rounds={args.rounds}",
                   *(o for o in overrides if not o.lstrip("+~").startswith("hydra."))])
    task, model = cfg["task"], cfg["model"]
    if model["name"] != "mlp" or "num_features" not in task["spec"]:
        return (f"the stock baseline trains an MLP on feature vectors; task={task['name']} "
                f"model={model['name']} has no stock counterpart here (use --task tabular)")
    synthetic = task.get("synthetic") or {}
    return {"num_features": int(task["spec"]["num_features"]),
            "num_classes": int(task["spec"]["num_classes"]),
            "hidden": [int(h) for h in model.get("hidden", [])],
            "dropout": float(model.get("dropout", 0.0)),
            "activation": model.get("activation", "relu"),
            "train_size": int(synthetic.get("train_size", 200)),
            "test_size": int(synthetic.get("test_size", 50)),
            "batch_size": int(cfg["batch_size"]), "local_epochs": int(cfg["local_epochs"]),
            "lr": float(cfg["lr"]), "optimizer": cfg["optimizer"],
            "client_cpus": float(cfg["simulation"]["client_cpus"]), "seed": int(cfg["seed"])}


def run_stock(sites: int, args: argparse.Namespace, spec: dict[str, Any], progress: Progress,
              bar, *, repeat: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {"num_hospitals": sites, "sites_per_round": args.sites_per_round,
                           "rounds": args.rounds, "status": "ok", "repeat": repeat}
    job = {"spec": spec, "num_sites": sites, "sites_per_round": args.sites_per_round,
           "rounds": args.rounds}
    # its own small module: the stock process imports only what a stock Flower app would
    command = [sys.executable, "-c", "import sys\nfrom simulations.benchmarks.flower_stock "
               "import run_flower_stock\nrun_flower_stock(sys.argv[1])", json.dumps(job)]

    def on_line(line: str) -> None:
        if "[ROUND " in line:
            progress.update(bar, description=f"N={sites}: Flower stock, {line.split('[')[-1]}")

    progress.update(bar, description=f"N={sites}: Flower stock, repeat {repeat + 1}")
    returncode, lines, launched_at = _run_watched(command, args, row, on_line)
    results = [line.split(STOCK_MARK, 1)[1] for _, line in lines if STOCK_MARK in line]
    if returncode != 0 or not results:
        if row["status"] == "ok":
            row["status"] = "failed: no rounds reported"
        row["stderr_tail"] = [line for _, line in lines[-STDERR_TAIL_LINES:]]
        return row
    rounds = json.loads(results[-1])
    _round_times(row, rounds["started_at"], rounds["duration_s"], launched_at)
    return row


# --- repeats ------------------------------------------------------------------------------------

TIMINGS = ("to_header_s", "time_to_first_round_s", "first_round_s", "to_first_round_end_s",
           "median_round_s", "last_round_s", "total_wall_s", "run_duration_s")
MEMORY = ("peak_rss_tree_mb", "peak_private_rss_mb", "peak_object_store_mb", "peak_processes")


def combine_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the repeats of one N: timings are medians over the runs that succeeded (the
    time to first round also its min), memory the largest; a failed run is named in
    ``failed_repeats`` (every run failed: the first failure is the row)."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {**runs[0], "runs": runs}
    row = {**ok[0], "runs": runs, "repeats": len(ok),
           "failed_repeats": [r["status"] for r in runs if r["status"] != "ok"]}
    for key in TIMINGS:
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = round(statistics.median(values), 3) if values else None
    for key in MEMORY:
        row[key] = max(r[key] for r in ok)
    firsts = [r["time_to_first_round_s"] for r in ok if r.get("time_to_first_round_s") is not None]
    row["time_to_first_round_min_s"] = min(firsts) if firsts else None
    row["median_covers"] = ok[0].get("median_covers", "")
    return row


def compare_with_stock(ours: dict[str, Any], stock: dict[str, Any]) -> dict[str, Any]:
    """Our row with Flower stock's beside it and the ratios ours / stock."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    both = ours["status"] == "ok" and stock["status"] == "ok"
    return {**ours, "stock": stock,
            "stock_ratio_first_round": ratio(ours.get("time_to_first_round_s"),
                                             stock.get("time_to_first_round_s")) if both else None,
            "stock_ratio_first_round_min": ratio(ours.get("time_to_first_round_min_s"),
                                                 stock.get("time_to_first_round_min_s"))
            if both else None,
            "stock_ratio_first_round_end": ratio(ours.get("to_first_round_end_s"),
                                                 stock.get("to_first_round_end_s"))
            if both else None,
            "stock_ratio_median_round": ratio(ours.get("median_round_s"),
                                              stock.get("median_round_s")) if both else None}


# --- table and verdict --------------------------------------------------------------------------

def _fmt(value: Any, width: int, spec: str = ".2f") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'N':>5} {'K':>4} {'trained':>8} {'datagen s':>9} {'header s':>8} {'1st rnd s':>9} "
          f"{'round1 s':>8} {'median s':>8} {'last s':>7} {'RSS MB':>8} {'priv MB':>8} "
          f"{'shm MB':>7} {'procs':>5} {'ratio':>6} {'total s':>8}")
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['num_hospitals']:>5} {row['sites_per_round']:>4} {row['status']}"
                  f" (peak RSS {row.get('peak_rss_tree_mb')} MB)")
            continue
        trained = row["trained_per_round"][:-1] or row["trained_per_round"]
        print(f"{row['num_hospitals']:>5} {row['sites_per_round']:>4} "
              f"{_fmt(statistics.median(trained) if trained else None, 8, '.0f')} "
              f"{_fmt(row['data_generation_s'], 9)} {_fmt(row['to_header_s'], 8)} "
              f"{_fmt(row['time_to_first_round_s'], 9)} {_fmt(row['first_round_s'], 8)} "
              f"{_fmt(row['median_round_s'], 8)} "
              f"{_fmt(row['last_round_s'], 7)} {_fmt(row['peak_rss_tree_mb'], 8, '.0f')} "
              f"{_fmt(row['peak_private_rss_mb'], 8, '.0f')} "
              f"{_fmt(row['peak_object_store_mb'], 7, '.0f')} {row['peak_processes']:>5} "
              f"{_fmt(row.get('ratio'), 6)} {_fmt(row['total_wall_s'], 8, '.1f')}")


def print_stock_table(rows: list[dict[str, Any]]) -> None:
    compared = [r for r in rows if "stock" in r]
    if not compared:
        return
    print(f"\n{'N':>5} {'1st rnd ours':>12} {'min':>6} {'stock':>7} {'min':>6} {'ours/stock':>10} "
          f"{'(min)':>6} | {'round1 ours':>11} {'stock':>6} | {'1st end ours':>12} {'stock':>6} "
          f"{'ours/stock':>10} | {'median ours':>11} {'stock':>6} "
          f"{'ours/stock':>10} | {'RSS ours':>8} {'stock':>6}")
    for row in compared:
        stock = row["stock"]
        if stock["status"] != "ok":
            print(f"{row['num_hospitals']:>5} Flower stock {stock['status']}")
            continue
        print(f"{row['num_hospitals']:>5} {_fmt(row.get('time_to_first_round_s'), 12)} "
              f"{_fmt(row.get('time_to_first_round_min_s'), 6)} "
              f"{_fmt(stock['time_to_first_round_s'], 7)} "
              f"{_fmt(stock['time_to_first_round_min_s'], 6)} "
              f"{_fmt(row['stock_ratio_first_round'], 10)} "
              f"{_fmt(row['stock_ratio_first_round_min'], 6)} | "
              f"{_fmt(row.get('first_round_s'), 11)} {_fmt(stock['first_round_s'], 6)} | "
              f"{_fmt(row.get('to_first_round_end_s'), 12)} "
              f"{_fmt(stock['to_first_round_end_s'], 6)} "
              f"{_fmt(row['stock_ratio_first_round_end'], 10)} | "
              f"{_fmt(row.get('median_round_s'), 11)} {_fmt(stock['median_round_s'], 6)} "
              f"{_fmt(row['stock_ratio_median_round'], 10)} | "
              f"{_fmt(row.get('peak_rss_tree_mb'), 8, '.0f')} "
              f"{_fmt(stock['peak_rss_tree_mb'], 6, '.0f')}")
    repeats = max(r.get("repeats", 1) for r in compared)
    print(f"(Flower stock: run_simulation + FedAvg + a ClientApp training the same MLP on random "
          f"tensors, alternated with ours; 1st rnd: launch to round 1's start, median (min) of "
          f"{repeats} runs; round1: round 1 with actor start-up; 1st end: launch to round 1's "
          f"end (both start round 1 while Ray starts); median: rounds "
          f"2..R-1; RSS: largest peak of the tree, MB)")


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = []
    largest = max(rows, key=lambda r: r["num_hospitals"])
    if largest["status"] != "ok":
        lines.append(f"RSS: FAIL: the largest run (N={largest['num_hospitals']}) "
                     f"{largest['status']}")
    else:
        rss = largest["peak_rss_tree_mb"]
        lines.append(f"RSS: {'PASS' if rss <= RSS_TARGET_MB else 'FAIL'}: peak RSS of the tree "
                     f"at N={largest['num_hospitals']} is {rss:.0f} MB (target <= {RSS_TARGET_MB})")
    smallest = min(r["num_hospitals"] for r in rows)
    ratios = [r for r in ok if r.get("ratio") is not None and r["num_hospitals"] != smallest]
    if not ratios:
        lines.append("ratio: not measured (needs the smallest N and a larger N to succeed)")
    else:
        worst = max(ratios, key=lambda r: r["ratio"])
        lines.append(f"ratio: {'PASS' if worst['ratio'] <= RATIO_TARGET else 'FAIL'}: worst "
                     f"median round ratio {worst['ratio']:.2f} at N={worst['num_hospitals']} "
                     f"(target <= {RATIO_TARGET:g})")
    unsampled = [r["num_hospitals"] for r in ok
                 if any(t > r["sites_per_round"] for t in r["trained_per_round"][:-1])]
    if unsampled:
        lines.append(f"note: more than sites_per_round sites trained in a round at N={unsampled}"
                     " (sampling not applied)")
    stock = [r for r in ok if r.get("stock_ratio_first_round") is not None]
    if stock:
        worst = max(stock, key=lambda r: r["stock_ratio_first_round"])
        ends = [r for r in stock if r.get("stock_ratio_first_round_end") is not None]
        worst_end = max(ends, key=lambda r: r["stock_ratio_first_round_end"]) if ends else None
        passed = worst["stock_ratio_first_round"] <= STOCK_RATIO_TARGET and (
            worst_end is None or worst_end["stock_ratio_first_round_end"] <= STOCK_RATIO_TARGET)
        lines.append(f"start-up: {'PASS' if passed else 'FAIL'}: time to first round is "
                     f"{worst['stock_ratio_first_round']:.2f}x Flower stock's at "
                     f"N={worst['num_hospitals']} (worst N; target <= {STOCK_RATIO_TARGET:g})"
                     + (f"; to the end of round 1: {worst_end['stock_ratio_first_round_end']:.2f}x"
                        f" at N={worst_end['num_hospitals']} (worst N)" if worst_end else ""))
    elif any("stock" in r for r in rows):
        lines.append("start-up: not compared (a run failed; see the stock table)")
    if any(r.get("median_covers", "").startswith("round 1 only") for r in ok):
        lines.append("note: with 2 rounds the median round is round 1, which includes starting "
                     "Ray's actors; use --rounds 3 or more for steady-state rounds")
    return lines


# --- command line -------------------------------------------------------------------------------

def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra ``key=value`` arguments apart from this script's flags (anywhere on the line)."""
    takes_value = {"--json", "--keep-dir", "--task"}
    flags, overrides = [], []
    for i, arg in enumerate(argv):
        if "=" in arg and not arg.startswith("-") and (i == 0 or argv[i - 1] not in takes_value):
            overrides.append(arg)
        else:
            flags.append(arg)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in OWN_KEYS:
            raise SystemExit(f"error: {key} is set by this benchmark; use {OWN_KEYS[key]} "
                             f"instead of the override {override!r}")
    return flags, overrides


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    flags, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any key=value argument is passed to every run as a Hydra override.")
    parser.add_argument("--sites", type=_positive(int), nargs="+", default=[10, 100, 1000],
                        help="numbers of hospitals (num_hospitals), one run each")
    parser.add_argument("--sites-per-round", type=_positive(int), default=10)
    parser.add_argument("--rounds", type=_positive(int), default=3,
                        help="at least 2: the last round is timed apart")
    parser.add_argument("--task", default="tabular")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--keep-dir", type=Path,
                        help="keep runs, caches and logs here (a new or empty folder)")
    parser.add_argument("--poll-s", type=_positive(float), default=0.2,
                        help="seconds between memory samples")
    parser.add_argument("--shm-every", type=_positive(int), default=5,
                        help="look at /dev/shm descriptors every this many samples")
    parser.add_argument("--timeout-s", type=_positive(float), default=7200,
                        help="a run still going after this is killed and marked failed")
    parser.add_argument("--repeats", type=_positive(int), default=3,
                        help="runs of ours (and of Flower stock) at each N, alternated")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Flower stock (run_simulation + FedAvg) at each N")
    parser.add_argument("--dp", action="store_true",
                        help="also time the same run with privacy=dp, alternated, and print "
                             "the ratio DP / no DP")
    args = parser.parse_args(flags)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the median round leaves out the last one")
    if any(args.sites_per_round > n for n in args.sites):
        parser.error(f"--sites-per-round {args.sites_per_round} is larger than the smallest "
                     f"--sites {min(args.sites)}; expected at most every site")
    if args.keep_dir and args.keep_dir.exists() and (
            not args.keep_dir.is_dir() or any(args.keep_dir.iterdir())):
        parser.error(f"--keep-dir {args.keep_dir} exists and is not an empty folder; expected a "
                     "new or empty folder (each N needs a fresh data cache)")
    return args, overrides


def _measure(sites: int, args: argparse.Namespace, overrides: list[str], work: Path,
             spec: dict[str, Any] | None, progress: Progress, bar) -> dict[str, Any]:
    """``--repeats`` runs of ours at ``sites`` hospitals, alternated with Flower stock's (and,
    with ``--dp``, with ours under ``privacy=dp``), the order rotated every repeat."""
    ours, stock, dp = [], [], []
    kinds = ["ours", *(["dp"] if args.dp else []), *(["stock"] if spec is not None else [])]
    for repeat in range(args.repeats):
        for who in kinds[repeat % len(kinds):] + kinds[:repeat % len(kinds)]:
            if who == "ours":
                ours.append(run_sites(sites, args, overrides, work, progress, bar,
                                      repeat=repeat))
            elif who == "dp":
                dp.append(run_sites(sites, args, [*overrides, "privacy=dp"], work, progress,
                                    bar, repeat=repeat))
            else:
                stock.append(run_stock(sites, args, spec, progress, bar, repeat=repeat))
    datagen = {k: ours[0][k] for k in ("data_generation_s", "data_generation_error")
               if k in ours[0]}
    row = {**combine_repeats(ours), **datagen}
    if dp:
        row = compare_with_dp(row, combine_repeats(dp))
    return compare_with_stock(row, combine_repeats(stock)) if stock else row


def compare_with_dp(ours: dict[str, Any], dp: dict[str, Any]) -> dict[str, Any]:
    """Our row with the same run under DP-SGD beside it: the ratios DP / no DP (issue 18's
    target: the whole run within 1.5x)."""
    def ratio(key: str) -> float | None:
        a, b = dp.get(key), ours.get(key)
        both = ours["status"] == "ok" and dp["status"] == "ok"
        return round(a / b, 2) if both and a is not None and b else None

    return {**ours, "dp": dp, "dp_ratio_total": ratio("total_wall_s"),
            "dp_ratio_first_round": ratio("time_to_first_round_s"),
            "dp_ratio_median_round": ratio("median_round_s")}


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    spec = stock_spec(args, overrides) if args.stock else None
    if isinstance(spec, str):
        console.print(f"[yellow]Flower stock not measured:[/] {spec}")
        spec = None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medsilo-many-sites-") as tmp:
        work = args.keep_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=console, transient=True)
        with progress:
            for sites in args.sites:
                bar = progress.add_task(f"N={sites}", total=None)
                row = _measure(sites, args, overrides, work, spec, progress, bar)
                progress.remove_task(bar)
                rows.append(row)
                if row.get("data_generation_error"):
                    progress.console.print(f"[yellow]N={sites}: data generation alone could not "
                                           "be timed[/] (see data_generation_error in the JSON)")
                for who, run in [("ours", r) for r in row["runs"]] + [
                        ("Flower stock", r) for r in row.get("stock", {}).get("runs", [])]:
                    if run["status"] == "ok":
                        continue
                    progress.console.print(f"[bold red]N={sites} {who}, repeat "
                                           f"{run['repeat'] + 1}: {run['status']}[/]; last "
                                           "lines of its stderr:")
                    for line in run.get("stderr_tail", []):
                        progress.console.print(f"  {line}", markup=False, highlight=False)
                if row["status"] == "ok":
                    stock = row.get("stock", {})
                    progress.console.print(
                        f"N={sites}: time to first round {row['time_to_first_round_s']} s"
                        + (f" (Flower stock {stock['time_to_first_round_s']} s)"
                           if stock.get("status") == "ok" else "")
                        + f", median round {row['median_round_s']} s, peak RSS "
                        f"{row['peak_rss_tree_mb']:.0f} MB, total {row['total_wall_s']:.1f} s")
    base = min(rows, key=lambda r: r["num_hospitals"])
    for row in rows:
        if (row["status"] == "ok" and base["status"] == "ok" and row["median_round_s"]
                and base["median_round_s"]):
            row["ratio"] = round(row["median_round_s"] / base["median_round_s"], 2)
    print_table(rows)
    print(f"(N hospitals, K sites per round; trained: median sites trained per round; header: "
          f"launch to sites written; 1st rnd: launch to round 1's start; round1: round 1 with "
          f"actor start-up; median: rounds 2..R-1; last: final round, every site evaluates; "
          f"ratio: median / N={base['num_hospitals']}; RSS: sum of VmRSS over the process tree, "
          f"shared pages counted per process; priv: sum of RssAnon; shm: Ray object store in "
          f"/dev/shm, allocated; timings: median of {args.repeats} runs, memory: the largest)")
    print_stock_table(rows)
    for row in rows:
        if "dp" in row:
            dp = row["dp"]
            print(f"N={row['num_hospitals']}: privacy=dp / off: whole run "
                  f"{_fmt(dp.get('total_wall_s'), 1, '.1f')} / "
                  f"{_fmt(row.get('total_wall_s'), 1, '.1f')} s = {row['dp_ratio_total']}x "
                  f"(target <= 1.5x); first round {row['dp_ratio_first_round']}x; median round "
                  f"{row['dp_ratio_median_round']}x")
    for line in verdict(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
