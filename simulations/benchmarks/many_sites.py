"""Many simulated hospitals on one machine: round time, memory and start-up as sites grow.

    python -m simulations.benchmarks.many_sites [--sites 10 100 1000] [--sites-per-round 10]
        [--rounds 3] [--task tabular] [--json PATH] [--keep-dir DIR] [key=value ...]

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

Ratio: median round at N divided by the median round at the smallest N. Targets (issue 9): peak
RSS of the tree at the largest N <= 4096 MB, and ratio <= 2 at every N. The sites trained per
round (from report.json) are printed so that a run in which every site trains (no sampling) is
visible as such.
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

RSS_TARGET_MB = 4096
RATIO_TARGET = 2.0
# keys this script sets itself, and the flag a user gives instead
OWN_KEYS = {"task": "--task", "num_hospitals": "--sites", "sites_per_round": "--sites-per-round",
            "rounds": "--rounds", "hydra.run.dir": "--keep-dir", "data.cache_dir": "--keep-dir"}
HEADER_MARK = " hospitals · "  # simulations/run.py's first line, once the site folders are known
STDERR_TAIL_LINES = 30

console = Console(stderr=True)


# --- the process tree, read from /proc ----------------------------------------------------------

def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


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
        children = _children_by_parent()
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


def run_sites(sites: int, args: argparse.Namespace, overrides: list[str], work: Path,
              progress: Progress, bar) -> dict[str, Any]:
    row: dict[str, Any] = {"num_hospitals": sites, "sites_per_round": args.sites_per_round,
                           "rounds": args.rounds, "status": "ok"}
    progress.update(bar, description=f"N={sites}: data generation alone (cold)")
    try:
        row["data_generation_s"] = round(
            data_generation_s(args.task, sites, overrides, work / f"cache-datagen-{sites}"), 2)
    except RuntimeError as err:
        row["data_generation_s"] = None
        row["data_generation_error"] = str(err)
    if not args.keep_dir:  # its only purpose was the timing
        shutil.rmtree(work / f"cache-datagen-{sites}", ignore_errors=True)

    run_dir, cache_dir = work / f"run-{sites}", work / f"cache-{sites}"
    command = [sys.executable, "-m", "simulations.run", f"task={args.task}",
               f"num_hospitals={sites}", f"sites_per_round={args.sites_per_round}",
               f"rounds={args.rounds}", f"hydra.run.dir={run_dir}",
               f"data.cache_dir={cache_dir}", *overrides]
    row["command"] = " ".join(command[1:])
    lines: list[tuple[float, str]] = []

    def on_line(line: str) -> None:
        if HEADER_MARK in line:
            progress.update(bar, description=f"N={sites}: sites written, starting Ray")
        elif line.startswith("round "):
            progress.update(bar, description=f"N={sites}: {line.split(':')[0]} of {args.rounds}"
                            " done")

    progress.update(bar, description=f"N={sites}: starting the run (fresh cache)")
    launched_at, launched = time.time(), time.perf_counter()
    # stdout is not read: the run writes its progress and errors to stderr
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
    header = [t for t, line in lines if HEADER_MARK in line]
    row["to_header_s"] = round(header[0] - launched_at, 2) if header else None

    report_path = run_dir / "report.json"
    if proc.returncode != 0 or not report_path.is_file():
        if row["status"] == "ok":
            row["status"] = (f"failed: exit code {proc.returncode}" if proc.returncode
                             else "failed: no report.json")
        row["stderr_tail"] = [line for _, line in lines[-STDERR_TAIL_LINES:]]
        return row
    report = json.loads(report_path.read_text())
    # each round's wall time and start, as the run's own round loop measured them
    durations = [float(r["duration_s"]) for r in report["rounds"]]
    first_started_at = report["rounds"][0]["started_at"] if report["rounds"] else None
    row["round_s"] = [round(d, 3) for d in durations]
    row["time_to_first_round_s"] = (round(first_started_at - launched_at, 2)
                                    if first_started_at is not None else None)
    median, row["median_covers"] = _median_round(durations)
    row["median_round_s"] = round(median, 3) if median is not None else None
    row["first_round_s"] = row["round_s"][0] if durations else None
    row["last_round_s"] = row["round_s"][-1] if durations else None
    trained = [len(r.get("train", {})) for r in report.get("rounds", [])]
    row["trained_per_round"] = trained
    row["asked_per_round"] = [r.get("asked") for r in report.get("rounds", [])]
    row["run_duration_s"] = report.get("run", {}).get("duration_s")
    return row


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


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medsilo-many-sites-") as tmp:
        work = args.keep_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=console, transient=True)
        with progress:
            for sites in args.sites:
                bar = progress.add_task(f"N={sites}", total=None)
                row = run_sites(sites, args, overrides, work, progress, bar)
                progress.remove_task(bar)
                rows.append(row)
                if row.get("data_generation_error"):
                    progress.console.print(f"[yellow]N={sites}: data generation alone could not "
                                           "be timed[/] (see data_generation_error in the JSON)")
                if row["status"] != "ok":
                    progress.console.print(f"[bold red]N={sites} {row['status']}[/]; last "
                                           "lines of its stderr:")
                    for line in row.get("stderr_tail", []):
                        progress.console.print(f"  {line}", markup=False, highlight=False)
                else:
                    progress.console.print(
                        f"N={sites}: median round {row['median_round_s']} s, peak RSS "
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
          f"/dev/shm, allocated)")
    for line in verdict(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
