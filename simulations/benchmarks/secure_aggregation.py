"""Secure vs plaintext rounds, side by side, on a ~1M-parameter model, with Flower's SecAgg+.

    python -m simulations.benchmarks.secure_aggregation [--sites 5 20] [--repeats 3]
        [--rounds 4] [--no-flower] [--json PATH]

For each number of simulated sites n, ``--repeats`` times, four runs interleaved (A, B, C, D,
A, B, C, D, ...: machine load drifts, and each variant sees the same drift):

- ``medsilo plain``: ``python -m simulations.run secagg=off`` with the tabular task, an MLP of
  two 1024-wide hidden layers (≈1.06M parameters), one local epoch, ``baselines=none``;
- ``medsilo secure``: the same with ``secagg=on`` (full SecAgg, every pair masks, majority t);
- ``flower plain`` and ``flower secagg+``: Flower 1.41's own legacy stack on the same engine
  (``run_simulation``, Ray, one CPU per ClientApp): ``DefaultWorkflow`` with FedAvg, then with
  ``SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=n//2 + 1)`` and
  ``secaggplus_mod`` on the ClientApp; a NumPyClient training the same MLP for one epoch (batch
  32, Adam) on 225 random examples per site and evaluating on 75, every site every round.
  That API is not Flower's public one: it is reached through ``privacy.compat.
  flower_legacy_api()`` (tests/test_compat.py), and without it these rows say why.

Each run is a fresh subprocess. Measured per run:

- steady round: the median of ``duration_s`` over rounds 2..R (round 1 also pays for starting
  Ray's actors); a medsilo round is report.json's ``rounds[].duration_s`` (training, the SecAgg
  stages, federated and pooled evaluation); a Flower round runs from its strategy's
  ``configure_fit`` to its ``aggregate_evaluate`` (training or the SecAgg+ stages, then
  federated evaluation);
- start-up: launch of the subprocess until round 1 starts (interpreter, imports, site data,
  Ray), and round 1 apart;
- by stage (secure runs): the median over rounds 2..R of each SecAgg stage's wall seconds
  (report.json ``rounds[].secure_aggregation.stage_s``: sending, the sites' answers and the
  server's work on them; ``decode`` the sum), and ``other``, the rest of the round;
- upload per site per round: the bytes of every ``train*`` reply a site sent (all SecAgg stage
  replies; the model update in a plain round) as Flower serialises them (``privacy.protocol.
  content_size``): from each site's egress log for medsilo, from the replies the ServerApp
  pulled for Flower.

Each run's line shows the machine's 1-minute load average before and after it: on shared
cores the secure variant, with five messages per site per round instead of one, slows more
under load than the plain one.

Reported per n and variant: the median and min over repeats of the per-run steady round, the
median start-up and round 1, the upload; ratio = median secure steady / median plain steady of
the same stack, and the ratios of adjacent (same repeat) pairs. Target (issue 18):
medsilo secure / plain ≤ 1.5 at every n.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MODEL = ("task=tabular", "model.hidden=[1024,1024]", "model.dropout=0.0", "local_epochs=1",
         "task.synthetic.train_size=200", "task.synthetic.test_size=50", "baselines=none")
VARIANTS = ("medsilo plain", "medsilo secure", "flower plain", "flower secagg+")
PAIRS = (("medsilo secure", "medsilo plain"), ("flower secagg+", "flower plain"))
RATIO_TARGET = 1.5
RESULT_MARK = "SECAGG-BENCHMARK-RESULT "  # the Flower child's one line of JSON
RUN_TIMEOUT_S = 1800
STDERR_TAIL_LINES = 15
# Flower's stand-in for a site: as many examples as a medsilo tabular site here, 35 features
FLOWER_TRAIN, FLOWER_TEST, FLOWER_FEATURES = 225, 75, 35


# --- what one run measured (pure: tested on tiny inputs) -----------------------------------------

def steady_round(durations: Sequence[float]) -> float | None:
    """The median of rounds 2..R: round 1 also pays for starting the engine's actors."""
    later = list(durations[1:])
    return statistics.median(later) if later else None


def stage_profile(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per secure-aggregation stage, the median over rounds 2..R of its wall seconds (report.json
    ``rounds[].secure_aggregation.stage_s``), and ``other``: the rest of the round (federated
    and pooled evaluation, the round's record and checkpoint)."""
    per_stage: dict[str, list[float]] = collections.defaultdict(list)
    for record in rounds[1:]:
        stages = (record.get("secure_aggregation") or {}).get("stage_s") or {}
        for stage, seconds in stages.items():
            per_stage[stage].append(float(seconds))
        if stages:
            per_stage["other"].append(float(record["duration_s"]) - sum(stages.values()))
    return {stage: statistics.median(values) for stage, values in per_stage.items()}


def schedule(sites: Iterable[int], repeats: int,
             variants: Sequence[str]) -> list[tuple[int, int, str]]:
    """``(n, repeat, variant)`` in run order: per n, the variants one after another, repeated
    (A, B, A, B, ...), so slow drifts of the machine's load hit every variant alike."""
    return [(n, repeat, variant) for n in sites for repeat in range(repeats)
            for variant in variants]


def egress_upload(sites_dir: Path, rounds: int) -> float | None:
    """Mean bytes per site per round of the ``train*`` replies in the sites' egress logs."""
    per_site: dict[str, int] = collections.Counter()
    for log in sorted(sites_dir.glob("*/egress.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if str(entry.get("message_type", "")).startswith("train"):
                per_site[entry["site"]] += int(entry["bytes"])
    if not per_site or rounds < 1:
        return None
    return sum(per_site.values()) / len(per_site) / rounds


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (n, variant) from the runs (each: n, repeat, variant, status, steady_s,
    startup_s, round1_s, upload_bytes), and each secure variant's ratio to its plain one."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    by_key: dict[tuple[int, str], list[Mapping[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        by_key[(run["n"], run["variant"])].append(run)
    for (n, variant), group in by_key.items():
        ok = [r for r in group if r["status"] == "ok" and r.get("steady_s") is not None]
        steady = [r["steady_s"] for r in ok]
        rows[(n, variant)] = {
            "n": n, "variant": variant, "runs": len(group), "ok": len(ok),
            "steady_median_s": statistics.median(steady) if steady else None,
            "steady_min_s": min(steady) if steady else None,
            "startup_median_s": _median(r.get("startup_s") for r in ok),
            "round1_median_s": _median(r.get("round1_s") for r in ok),
            "upload_bytes": _median(r.get("upload_bytes") for r in ok),
            "stages_s": {stage: _median(r.get("stages_s", {}).get(stage) for r in ok)
                         for stage in dict.fromkeys(k for r in ok for k in r.get("stages_s", {}))},
            "failures": sorted({r["status"] for r in group if r["status"] != "ok"}),
        }
    for (n, _variant), row in rows.items():
        for secure, plain in PAIRS:
            if row["variant"] != secure or (n, plain) not in rows:
                continue
            base = rows[(n, plain)]
            if row["steady_median_s"] and base["steady_median_s"]:
                row["ratio"] = row["steady_median_s"] / base["steady_median_s"]
            pairs = _paired(by_key[(n, secure)], by_key[(n, plain)])
            row["pair_ratios"] = [round(a / b, 3) for a, b in pairs]
            if row["upload_bytes"] and base["upload_bytes"]:
                row["upload_ratio"] = row["upload_bytes"] / base["upload_bytes"]
    return [rows[key] for key in sorted(rows, key=lambda k: (k[0], VARIANTS.index(k[1])
                                                             if k[1] in VARIANTS else 99))]


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired(secure: Sequence[Mapping[str, Any]],
            plain: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    steady = {r["repeat"]: r["steady_s"] for r in plain if r["status"] == "ok"
              and r.get("steady_s")}
    return [(r["steady_s"], steady[r["repeat"]]) for r in secure
            if r["status"] == "ok" and r.get("steady_s") and r["repeat"] in steady]


def verdict(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "medsilo secure":
            continue
        ratio = row.get("ratio")
        if ratio is None:
            lines.append(f"n={row['n']}: FAIL: no ratio (runs failed: {row['failures']})")
        else:
            status = "PASS" if ratio <= RATIO_TARGET else "FAIL"
            lines.append(f"n={row['n']}: {status}: secure/plain steady round {ratio:.2f}x "
                         f"(target <= {RATIO_TARGET}x)")
    return lines


# --- the runs ------------------------------------------------------------------------------------

def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-STDERR_TAIL_LINES:])


def run_medsilo(n: int, rounds: int, secure: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as out:
        launch = time.time()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "simulations.run", f"hydra.run.dir={out}", *MODEL,
                 f"num_hospitals={n}", f"rounds={rounds}", f"secagg={'on' if secure else 'off'}"],
                capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {RUN_TIMEOUT_S} s"}
        report_path = Path(out) / "report.json"
        if done.returncode != 0 or not report_path.is_file():
            return {"status": f"exit {done.returncode}", "stderr": _tail(done.stderr)}
        report = json.loads(report_path.read_text())
        durations = [r["duration_s"] for r in report["rounds"]]
        aborted = [r["round"] for r in report["rounds"]
                   if (r.get("secure_aggregation") or {}).get("aborted")]
        return {"status": "ok" if not aborted else f"rounds {aborted} aborted",
                "rounds_s": durations, "steady_s": steady_round(durations),
                "startup_s": report["rounds"][0]["started_at"] - launch,
                "round1_s": durations[0], "stages_s": stage_profile(report["rounds"]),
                "upload_bytes": egress_upload(Path(out) / "sites", len(durations))}


def flower_legacy() -> Any:
    """Flower 1.41's legacy API, where its SecAgg+ lives, through ``privacy/compat.py`` (the one
    module allowed Flower's non-public API, tests/test_compat.py), or why it is not there."""
    from privacy import compat

    legacy = getattr(compat, "flower_legacy_api", None)
    if legacy is None:
        return ("not measured: Flower's SecAgg+ (and its plain run on the same stack) needs "
                "Flower's legacy API (flwr.server.workflow.SecAggPlusWorkflow, "
                "flwr.client.mod.secaggplus_mod, flwr.server.LegacyContext), which only "
                "privacy/compat.py may import, and compat has no flower_legacy_api() yet")
    return legacy()


def run_flower(n: int, rounds: int, secure: bool) -> dict[str, Any]:
    if isinstance(why_not := flower_legacy(), str):
        return {"status": why_not}
    launch = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "simulations.benchmarks.secure_aggregation", "--flower-child",
             "secagg+" if secure else "plain", "--sites", str(n), "--rounds", str(rounds)],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {RUN_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        return {"status": f"exit {done.returncode}",
                "stderr": _tail(done.stderr + "\n" + done.stdout)}
    result = json.loads(lines[-1][len(RESULT_MARK):])
    durations = result["rounds_s"]
    return {"status": "ok", "rounds_s": durations, "steady_s": steady_round(durations),
            "startup_s": result["round1_started_at"] - launch, "round1_s": durations[0],
            "upload_bytes": result["upload_bytes"]}


RUNNERS = {"medsilo plain": lambda n, r: run_medsilo(n, r, secure=False),
           "medsilo secure": lambda n, r: run_medsilo(n, r, secure=True),
           "flower plain": lambda n, r: run_flower(n, r, secure=False),
           "flower secagg+": lambda n, r: run_flower(n, r, secure=True)}


# --- Flower's own stack, in the child process ----------------------------------------------------

def flower_child(n: int, rounds: int, secure: bool) -> dict[str, Any]:
    """Flower 1.41's legacy FedAvg, with or without SecAgg+, timed round by round."""
    import numpy as np
    import torch
    from flwr.simulation import run_simulation
    from torch import nn

    from models.mlp import TabularMLP
    from privacy.protocol import content_size

    flwr = flower_legacy()
    if isinstance(flwr, str):
        raise RuntimeError(flwr)

    def build() -> nn.Module:
        return TabularMLP(FLOWER_FEATURES, 2, hidden=(1024, 1024))

    class Site(flwr.NumPyClient):
        def __init__(self, partition: int) -> None:
            draw = torch.Generator().manual_seed(partition)
            size = FLOWER_TRAIN + FLOWER_TEST
            self.x = torch.randn(size, FLOWER_FEATURES, generator=draw)
            self.y = torch.randint(0, 2, (size,), generator=draw)
            self.model = build()

        def _load(self, parameters: list[np.ndarray]) -> None:
            keys = self.model.state_dict()
            self.model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                        for k, v in zip(keys, parameters)})

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            self._load(parameters)
            optimizer = torch.optim.Adam(self.model.parameters(), lr=0.003)
            for start in range(0, FLOWER_TRAIN, 32):
                end = min(start + 32, FLOWER_TRAIN)
                optimizer.zero_grad()
                nn.functional.cross_entropy(self.model(self.x[start:end]),
                                            self.y[start:end]).backward()
                optimizer.step()
            return ([v.detach().numpy() for v in self.model.state_dict().values()],
                    FLOWER_TRAIN, {})

        def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
            self._load(parameters)
            with torch.no_grad():
                loss = nn.functional.cross_entropy(self.model(self.x[FLOWER_TRAIN:]),
                                                   self.y[FLOWER_TRAIN:]).item()
            return loss, FLOWER_TEST, {}

    client_app = flwr.ClientApp(
        client_fn=lambda context: Site(int(context.node_config["partition-id"])).to_client(),
        mods=[flwr.secaggplus_mod] if secure else [])
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    round1_started_at: list[float] = []

    class TimedFedAvg(flwr.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            starts[server_round] = time.perf_counter()
            if server_round == 1:
                round1_started_at.append(time.time())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            ends[server_round] = time.perf_counter()
            return super().aggregate_evaluate(server_round, results, failures)

    uploads: collections.Counter[int] = collections.Counter()

    class CountingGrid:
        """The ServerApp's grid, counting the bytes of every train reply it hands back."""

        def __init__(self, grid: Any) -> None:
            self._grid = grid

        def __getattr__(self, name: str) -> Any:
            return getattr(self._grid, name)

        def _count(self, replies: Iterable[Any]) -> list[Any]:
            replies = list(replies)
            for reply in replies:
                if reply.metadata.message_type.startswith("train") and not reply.has_error():
                    uploads[reply.metadata.src_node_id] += content_size(reply.content)[0]
            return replies

        def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
            return self._count(self._grid.pull_messages(message_ids))

        def send_and_receive(self, messages: Iterable[Any], *,
                             timeout: float | None = None) -> list[Any]:
            return self._count(self._grid.send_and_receive(messages, timeout=timeout))

    server_app = flwr.ServerApp()

    @server_app.main()
    def main(grid, context):  # type: ignore[no-untyped-def]
        initial = [v.detach().numpy() for v in build().state_dict().values()]
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n,
                               min_evaluate_clients=n, min_available_clients=n,
                               initial_parameters=flwr.ndarrays_to_parameters(initial))
        legacy = flwr.LegacyContext(context, config=flwr.ServerConfig(num_rounds=rounds),
                                    strategy=strategy)
        fit = (flwr.SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=n // 2 + 1)
               if secure else None)
        flwr.DefaultWorkflow(fit_workflow=fit)(CountingGrid(grid), legacy)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    done = sorted(ends)
    if len(done) != rounds or not round1_started_at:
        raise RuntimeError(f"Flower finished {len(done)} of {rounds} rounds")
    return {"rounds_s": [ends[r] - starts[r] for r in done],
            "round1_started_at": round1_started_at[0],
            "upload_bytes": sum(uploads.values()) / n / rounds}


# --- output --------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = (f"{'n':>3}  {'variant':<15}{'steady med':>11}{'min':>7}{'ratio':>7}  "
            f"{'pairs':<20}{'start-up':>9}{'round 1':>8}{'upload/site/round':>19}")
    lines = [head, "-" * len(head)]
    for row in rows:
        ratio = row.get("ratio")
        upload = row.get("upload_bytes")
        upload_text = "-" if upload is None else f"{upload / 1e6:.3f} MB"
        if row.get("upload_ratio") is not None:
            upload_text += f" ({row['upload_ratio']:.4f}x)"
        lines.append(
            f"{row['n']:>3}  {row['variant']:<15}{_fmt(row['steady_median_s'], '.2f'):>9} s"
            f"{_fmt(row['steady_min_s'], '.2f'):>7}{_fmt(ratio, '.2f'):>7}  "
            f"{','.join(map(str, row.get('pair_ratios', []))):<20}"
            f"{_fmt(row['startup_median_s'], '.1f'):>7} s{_fmt(row['round1_median_s'], '.1f'):>6} s"
            f"{upload_text:>19}")
        if row.get("stages_s"):
            lines.append("     by stage (s): " + ", ".join(
                f"{stage} {_fmt(seconds, '.3f')}" for stage, seconds in row["stages_s"].items()))
        if row["failures"]:
            lines.append(f"     {row['ok']}/{row['runs']} runs ok; "
                         + "; ".join(row["failures"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="per run; round 1 is start-up")
    parser.add_argument("--no-flower", action="store_true", help="medsilo's two variants only")
    parser.add_argument("--json", type=Path, default=None, help="also write runs and rows here")
    parser.add_argument("--flower-child", choices=("plain", "secagg+"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flower_child:
        result = flower_child(args.sites[0], args.rounds, secure=args.flower_child == "secagg+")
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is start-up, not a steady round)")
    variants = VARIANTS[:2] if args.no_flower else VARIANTS
    runs = []
    for n, repeat, variant in schedule(args.sites, args.repeats, variants):
        load = os.getloadavg()[0]
        result = {"n": n, "repeat": repeat, "variant": variant, **RUNNERS[variant](n, args.rounds)}
        result["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        runs.append(result)
        rounds = ", ".join(f"{d:.2f}" for d in result.get("rounds_s", []))
        print(f"n={n:<3} repeat {repeat + 1}/{args.repeats} {variant:<15} {result['status']}"
              f"  rounds [{rounds}] s  load {result['load'][0]} -> {result['load'][1]}",
              flush=True)
        if result["status"] != "ok" and result.get("stderr"):
            print("    " + result["stderr"].replace("\n", "\n    "), flush=True)
    rows = summarize(runs)
    print()
    print(f"steady round = median of rounds 2..{args.rounds} of a run; med/min over "
          f"{args.repeats} interleaved repeats; start-up = launch -> round 1 starts")
    print(table(rows))
    for line in verdict(rows):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
