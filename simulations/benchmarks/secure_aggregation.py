"""Secure vs plaintext rounds, side by side, on a ~1M-parameter model.

    python -m simulations.benchmarks.secure_aggregation [--sites 5 20 50] [--rounds 2]

For each number of simulated sites: the tabular task with an MLP of two 1024-wide hidden layers
(≈1.06M parameters), one local epoch, ``secagg=off`` then ``secagg=on``, each a full
``python -m simulations.run`` in a subprocess. Prints per-round wall time (the run's own duration
divided by rounds, start-up excluded), the ratio, and each site's upload per round (secure: all
four stage replies as Flower serialises them; plaintext: the fp32 model), as a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = ("task=tabular", "model.hidden=[1024,1024]", "model.dropout=0.0", "local_epochs=1",
         "task.synthetic.train_size=200", "task.synthetic.test_size=50")


def run(sites: int, rounds: int, secure: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "simulations.run", f"hydra.run.dir={out}",
                        *MODEL, f"num_hospitals={sites}", f"rounds={rounds}",
                        f"secagg={'on' if secure else 'off'}"], check=True,
                       capture_output=True, text=True)
        report = json.loads((Path(out) / "report.json").read_text())
    per_round = report["run"]["duration_s"] / rounds
    if secure:
        uploads = [b for r in report["rounds"]
                   for b in (r["secure_aggregation"] or {}).get("upload_bytes", {}).values()]
        plaintext = report["rounds"][0]["secure_aggregation"]["plaintext_update_bytes"]
        upload = statistics.mean(uploads)
    else:
        upload = plaintext = None
    return {"round_s": per_round, "upload_bytes": upload, "plaintext_bytes": plaintext,
            "final_accuracy": report["final"]["global"].get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for sites in args.sites:
        plain = run(sites, args.rounds, secure=False)
        secure = run(sites, args.rounds, secure=True)
        rows.append({"sites": sites, "plain_round_s": round(plain["round_s"], 2),
                     "secure_round_s": round(secure["round_s"], 2),
                     "time_ratio": round(secure["round_s"] / plain["round_s"], 2),
                     "upload_bytes": int(secure["upload_bytes"]),
                     "plaintext_bytes": secure["plaintext_bytes"],
                     "bytes_ratio": round(secure["upload_bytes"] / secure["plaintext_bytes"], 4),
                     "accuracy_plain": plain["final_accuracy"],
                     "accuracy_secure": secure["final_accuracy"]})
        print(f"n={sites:3d}  round {rows[-1]['plain_round_s']:7.2f} s plain, "
              f"{rows[-1]['secure_round_s']:7.2f} s secure ({rows[-1]['time_ratio']}x)  "
              f"upload {rows[-1]['upload_bytes']} B vs fp32 {rows[-1]['plaintext_bytes']} B "
              f"({rows[-1]['bytes_ratio']}x)", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
