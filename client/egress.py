"""The one door out of a site: every reply a hospital sends is built here and logged first.

:func:`send` (a reply with content) and :func:`send_error` (a handler failed) are the only
places in ``client/`` that construct a Flower ``Message``; a test keeps it that way. Before a
reply leaves, one JSON line is appended to ``<state-dir>/egress.jsonl``::

    {"time": "2026-11-22T10:00:00.123+00:00", "site": "hospital_a", "run_id": 42, "round": 3,
     "message_type": "train", "kind": "update", "bytes": 3641, "sha256": "<64 hex>",
     "records": {"arrays": 3320, "metrics": 151, "site": 95},
     "model_update": true, "dp_sgd": true, "noise_multiplier": 1.06, "masked": false}

``model_update``, ``dp_sgd`` and ``masked`` say how the reply's model weights were protected,
read from the content itself (:func:`protection`): ``dp_sgd`` when the reply carries the site's
privacy ledger with DP-SGD steps at a noise multiplier σ > 0 (the update was trained with
Gaussian noise on clipped per-example gradients; σ is logged), ``masked`` when the weights left
as a secure-aggregation masked input (alone meaningless; the server sees only the sum). A reply
without model weights (metrics, a ledger, a refusal, a protocol stage) logs all three false.
Under hospital-level DP (privacy=site_dp) a masked update also logs ``"hospital_dp": true`` and
``hospital_epsilon``, the ε the site planned its noise share for (the share is inside the masked
vector, so the content cannot show it: the site's handler says so, client/secure_aggregation.py).

``sha256`` is Flower's own object id of the reply's content (``RecordDict.object_id``): a Merkle
hash over every record, and the id under which Flower ships the content, so the coordinator can
match it against what it received (the report lists it per round). ``bytes`` is the size of
the serialized content objects Flower transmits (message metadata aside); ``records`` splits it
per record. A privacy officer reads the log with ``python -m client.egress summarize LOG``.

The line is written (and flushed to disk) before the reply is returned to Flower: a reply that
could not be logged never leaves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from client.site import SiteSettings
from privacy import compat, protocol

EGRESS_LOG = "egress.jsonl"

# What a reply carries, as a privacy officer would name it.
EGRESS_KINDS = {
    "update": "model weights after local training",
    "masked-update": "a secure-aggregation masked model update (meaningless alone)",
    "metrics": "numbers about a round: example counts, loss, evaluation metrics",
    "privacy-ledger": "the site's DP ledger summary (epsilon spent), with no model",
    "refusal": "the site refused the run (unapproved app or another task), with the reason",
    "error": "the site failed to handle a message; only the error class and a code left",
    "secagg-keys": "secure aggregation: the site's public keys",
    "secagg-shares": "secure aggregation: encrypted secret shares for other sites",
    "secagg-consistency": "secure aggregation: the site's signature on the survivor set",
    "secagg-unmask": "secure aggregation: shares revealed to remove masks",
}

# A child of Flower's logger: its lines reach the SuperNode's console like Flower's own.
log = logging.getLogger("flwr.medsilo.egress")


def _server_round(msg: Message) -> int | None:
    """The round the incoming message belongs to: Flower's strategies put it in the config;
    the secure-aggregation stages without one carry it as the message's group id."""
    content = msg.content if msg.has_content() else None
    if content is not None:
        for record in content.config_records.values():
            if protocol.SERVER_ROUND in record:
                return int(record[protocol.SERVER_ROUND])
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else None


def _append(path: Path, entry: Mapping[str, Any], *, durable: bool = True) -> None:
    """One line, one write; ``durable``: flushed to disk, so that the log survives a crash
    right after sending. A simulated site (synthetic data on the coordinator's own machine)
    skips the fsync: ~5 ms a reply on a shared disk, six replies per site per round under
    secure aggregation."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def protection(content: RecordDict) -> dict[str, Any]:
    """How the model weights in ``content`` were protected, from what the content carries.

    ``dp_sgd``: the weights come with the site's privacy ledger recording DP-SGD steps at
    σ > 0 (a DP round always sends its ledger with the update: client/app.py train_with_dp);
    ``masked``: the weights are a secure-aggregation masked input (protocol.MASKED_UPDATE).
    """
    arrays = content.array_records.get(protocol.ARRAYS)
    if arrays is None:
        return {"model_update": False, "dp_sgd": False, "noise_multiplier": None,
                "masked": False}
    ledger = content.config_records.get(protocol.PRIVACY)
    sigma = float(ledger.get("noise_multiplier", 0.0)) if ledger is not None else 0.0
    dp = ledger is not None and int(ledger.get("steps", 0)) > 0 and sigma > 0
    return {"model_update": True, "dp_sgd": dp, "noise_multiplier": sigma if dp else None,
            "masked": protocol.MASKED_UPDATE in arrays}


def _log_reply(
    msg: Message, *, kind: str, site: SiteSettings, context: Context, server_round: int | None,
    size: int, sha256: str, **details: Any,
) -> dict[str, Any]:
    if kind not in EGRESS_KINDS:
        raise ValueError(f"egress kind {kind!r} is not one of {sorted(EGRESS_KINDS)}")
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "site": site.site_id,
        "run_id": int(context.run_id),
        "round": server_round if server_round is not None else _server_round(msg),
        "message_type": msg.metadata.message_type,
        "kind": kind,
        "bytes": size,
        "sha256": sha256,
        **details,
    }
    if site.state_dir is not None:
        _append(site.state_dir / EGRESS_LOG, entry, durable=not site.simulated)
    return entry


def send(
    msg: Message, content: RecordDict, *, kind: str, site: SiteSettings, context: Context,
    server_round: int | None = None, hospital_epsilon: float | None = None,
) -> Message:
    """The reply to ``msg`` carrying ``content``, logged as ``kind`` before it leaves.

    ``server_round`` defaults to the round in the incoming message's config.
    ``hospital_epsilon``: the update carries the site's hospital-level DP noise share, planned
    for this ε (privacy=site_dp).
    """
    # measured on a copy: the reply itself keeps no cached chunks (protocol.unshared)
    size, per_record, object_id = protocol.measure(content)
    details = protection(content)
    if hospital_epsilon is not None:
        if not details["masked"]:
            raise ValueError("a hospital-level DP noise share only leaves a site inside a "
                             "secure-aggregation masked update")
        details.update(hospital_dp=True, hospital_epsilon=float(hospital_epsilon))
    _log_reply(msg, kind=kind, site=site, context=context, server_round=server_round,
               size=size, sha256=object_id, records=per_record, **details)
    return Message(content=content, reply_to=msg)


def send_error(
    msg: Message, error: BaseException, *, site: SiteSettings, context: Context
) -> Message:
    """The error reply Flower would send for a failed handler, logged like any reply.

    Only the error's class and a short code leave the site (:func:`error_reason`): an error's
    text can quote a patient value or a local path. The full text goes to the site's own log
    under the same code, so the site's engineer finds it from the server's report.
    """
    reason = error_reason(error, site.site_id)
    log.error("handler for %s failed (%s); replying with the error class and code only",
              msg.metadata.message_type, reason, exc_info=error)
    payload = reason.encode("utf-8")
    _log_reply(msg, kind="error", site=site, context=context, server_round=None,
               size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), reason=reason,
               model_update=False, dp_sgd=False, noise_multiplier=None, masked=False)
    return Message(Error(code=compat.client_app_error_code(), reason=reason),
                   reply_to=msg)


def error_code(error: BaseException) -> str:
    """A short code naming this error's text (8 hex digits of its SHA-256): it identifies the
    log line at the site and reveals nothing of the text."""
    text = f"{type(error).__qualname__}:{error}".encode("utf-8", "replace")
    return hashlib.sha256(text).hexdigest()[:8]


def error_reason(error: BaseException, site_id: str) -> str:
    """What leaves the site for a failed handler: the site's name (the server reports it by
    hospital, not by node id), the error's class and a code; never values or paths."""
    return (f"{site_id}: {type(error).__name__} [site error {error_code(error)}]: details are "
            "in the site's own log")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"egress log {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from err
    return entries


def _update_line(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """One model update of the log: its round, protection and content id (None: no model)."""
    if "model_update" not in entry:  # a line from before protection was logged
        if entry["kind"] not in ("update", "masked-update"):
            return None
        return {"round": entry.get("round"), "message_type": entry.get("message_type"),
                "sha256": entry.get("sha256"), "dp_sgd": None, "noise_multiplier": None,
                "masked": entry["kind"] == "masked-update"}  # the kind always said so
    if not entry["model_update"]:
        return None
    return {"round": entry.get("round"), "message_type": entry.get("message_type"),
            "sha256": entry.get("sha256"), "dp_sgd": bool(entry["dp_sgd"]),
            "noise_multiplier": entry.get("noise_multiplier"), "masked": bool(entry["masked"]),
            "hospital_dp": bool(entry.get("hospital_dp", False)),
            "hospital_epsilon": entry.get("hospital_epsilon")}


def summarize(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Messages, bytes, kinds and rounds per run: what left the site, in numbers; and every
    model update with whether it was DP-noised and whether it was masked (``updates``)."""
    runs: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"messages": 0, "bytes": 0, "kinds": Counter(), "bytes_by_kind": Counter(),
                 "rounds": set(), "first": None, "last": None, "updates": []})
    for entry in entries:
        run = runs[int(entry["run_id"])]
        if (update := _update_line(entry)) is not None:
            run["updates"].append(update)
        run["messages"] += 1
        run["bytes"] += int(entry["bytes"])
        run["kinds"][entry["kind"]] += 1
        run["bytes_by_kind"][entry["kind"]] += int(entry["bytes"])
        if entry.get("round") is not None:
            run["rounds"].add(int(entry["round"]))
        run["first"] = run["first"] or entry["time"]
        run["last"] = entry["time"]
    return {
        "messages": sum(r["messages"] for r in runs.values()),
        "bytes": sum(r["bytes"] for r in runs.values()),
        "runs": {
            run_id: {**r, "kinds": dict(r["kinds"]), "bytes_by_kind": dict(r["bytes_by_kind"]),
                     "rounds": sorted(r["rounds"])}
            for run_id, r in sorted(runs.items())
        },
    }


# At most this many model updates are listed one by one per run (--json lists all).
UPDATES_LISTED = 50


def _protection_words(update: Mapping[str, Any]) -> str:
    dp = {True: f"DP-SGD noised (σ {update['noise_multiplier']:.3g})"
          if update.get("noise_multiplier") else "DP-SGD noised",
          False: "NOT DP-noised", None: "DP noise not recorded (older log line)"}[
        update["dp_sgd"]]
    if update.get("hospital_dp"):
        share = "hospital-level DP noise share added at the site"
        if update.get("hospital_epsilon") is not None:
            share += f" (planned ε ≤ {update['hospital_epsilon']:.3g})"
        dp = share if update["dp_sgd"] is False else f"{dp}, {share}"
    masked = {True: "masked by secure aggregation (the server sees only the sum)",
              False: "not masked (the server sees this update on its own)"}[update["masked"]]
    return f"{dp}, {masked}"


def _updates_lines(updates: Sequence[Mapping[str, Any]]) -> list[str]:
    if not updates:
        return ["  model updates: none left this site"]
    counts = {key: sum(1 for u in updates if u.get(key))
              for key in ("dp_sgd", "masked", "hospital_dp")}
    unknown = sum(1 for u in updates if u["dp_sgd"] is None)
    lines = [f"  model updates: {len(updates)}; DP-SGD noised: {counts['dp_sgd']} of "
             f"{len(updates)}; masked by secure aggregation: {counts['masked']} of "
             f"{len(updates)}"
             + (f"; with a hospital-level DP noise share: {counts['hospital_dp']} of "
                f"{len(updates)}" if counts["hospital_dp"] else "")
             + (f"; {unknown} from before protection was logged" if unknown else "")]
    for update in updates[:UPDATES_LISTED]:
        lines.append(f"    round {update['round']} {update['message_type']}: "
                     f"{_protection_words(update)}; sha256 {str(update['sha256'])[:16]}…")
    if len(updates) > UPDATES_LISTED:
        lines.append(f"    and {len(updates) - UPDATES_LISTED} more (--json lists every one)")
    return lines


def render_summary(summary: Mapping[str, Any], source: str) -> str:
    lines = [f"Egress log {source}: {summary['messages']} message(s), {summary['bytes']:,} bytes "
             f"left this site in {len(summary['runs'])} run(s)."]
    for run_id, run in summary["runs"].items():
        rounds = run["rounds"]
        span = f"rounds {rounds[0]}-{rounds[-1]}" if rounds else "no rounds"
        lines += ["", f"run {run_id}: {run['messages']} message(s), {run['bytes']:,} bytes, "
                      f"{span}, {run['first']} .. {run['last']}"]
        for kind, count in sorted(run["kinds"].items()):
            lines.append(f"  {kind:<18} {count:>5} message(s) {run['bytes_by_kind'][kind]:>12,} "
                         f"bytes  ({EGRESS_KINDS.get(kind, 'unknown kind')})")
        lines += _updates_lines(run["updates"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.egress",
        description="What left this hospital: summarize a site's egress log.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("summarize", help="messages, bytes, kinds and rounds per run")
    cmd.add_argument("log", type=Path, help=f"the site's <state-dir>/{EGRESS_LOG}")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        summary = summarize(read_log(args.log))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary, str(args.log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
