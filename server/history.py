"""What happened in each round, per site: the raw material of the report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message

from privacy import protocol


def node_label(node_id: int) -> str:
    """The name of a site that never answered: only its Flower node id is known."""
    return f"node {node_id}"


def is_node_label(name: str) -> bool:
    """Whether ``name`` is a :func:`node_label` rather than a site id."""
    prefix, _, number = name.partition(" ")
    return prefix == "node" and number.isdigit()


@dataclass
class RoundRecord:
    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> train metrics
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> eval metrics
    global_metrics: dict[str, float] | None = None
    site_weighted: dict[str, float] = field(default_factory=dict)  # Flower's aggregate of `sites`
    failures: list[dict[str, Any]] = field(default_factory=list)  # replies that carried errors
    declined: dict[str, str] = field(default_factory=dict)  # site -> why it did not train
    refused: dict[str, str] = field(default_factory=dict)  # site -> why it refused the run
    # site -> stage -> Flower's content id (SHA-256 Merkle hash) of the reply received: the same
    # value the site's egress log holds for what it sent (client/egress.py)
    received: dict[str, dict[str, str]] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> ledger summary
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> reason -> count
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    update_norms: dict[str, float] = field(default_factory=dict)  # site -> ||w_site - w_global||
    timed_out: list[str] = field(default_factory=list)  # sites asked that did not answer in time
    skipped_round: str | None = None  # why the global model was left unchanged this round
    secure_aggregation: dict[str, Any] | None = None  # server/secure_aggregation.py's record
    asked: int = 0  # sites sent the training message this round (sites_per_round sampling)
    started_at: float | None = None  # wall-clock time (Unix seconds) the round began
    duration_s: float | None = None  # wall seconds of the round, training through evaluation


@dataclass
class RunHistory:
    initial_global: dict[str, float] | None = None
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    node_sites: dict[int, str] = field(default_factory=dict)  # Flower node id -> site id

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for the checkpoint (server/checkpoint.py)."""
        return {"initial_global": self.initial_global,
                "rounds": [asdict(r) for _, r in sorted(self.rounds.items())],
                "node_sites": {str(k): v for k, v in self.node_sites.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunHistory:
        rounds = {int(r["round"]): RoundRecord(**r) for r in data.get("rounds", [])}
        return cls(initial_global=data.get("initial_global"), rounds=rounds,
                   node_sites={int(k): v for k, v in data.get("node_sites", {}).items()})

    def record_timeouts(self, server_round: int, asked: Iterable[int],
                        replies: Iterable[Message]) -> None:
        """Sites that were sent a message but did not answer before the round timeout."""
        answered = {msg.metadata.src_node_id for msg in replies}
        missing = [self.node_sites.get(node, node_label(node)) for node in asked
                   if node not in answered]
        self.round(server_round).timed_out.extend(sorted(missing))

    def round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    def record_replies(
        self, server_round: int, replies: Iterable[Message], stage: str
    ) -> list[Message]:
        """Record per-site metrics and failures; return the good replies sorted by site id.

        Sorting makes aggregation order (and so floating-point sums) independent of the
        order in which replies arrived: same seed, same config, same global model.
        """
        record = self.round(server_round)
        good: list[tuple[str, Message]] = []
        for msg in replies:
            if msg.has_error():
                record.failures.append(
                    {"stage": stage, "node_id": msg.metadata.src_node_id,
                     "reason": msg.error.reason}
                )
                continue
            status = msg.content[protocol.SITE]
            site = str(status[protocol.SITE_ID])
            self.node_sites[msg.metadata.src_node_id] = site
            record.received.setdefault(site, {})[stage] = msg.content.object_id
            skipped = {k[len(protocol.SKIPPED_PREFIX):]: int(v) for k, v in status.items()
                        if k.startswith(protocol.SKIPPED_PREFIX)}
            if skipped:
                record.skipped[site] = skipped
            if protocol.PRIVACY in msg.content:
                record.privacy[site] = protocol.decode_ledger(msg.content[protocol.PRIVACY])
            state = status.get(protocol.STATUS, protocol.STATUS_OK)
            if state == protocol.STATUS_DECLINED:
                record.declined[site] = str(status.get(protocol.REASON, "declined"))
                continue  # a declined site is left out of aggregation, never a zero update
            if state == protocol.STATUS_REFUSED:
                # e.g. the site has not approved this app version: it read none of its data
                record.refused[site] = str(status.get(protocol.REASON, "refused"))
                continue
            metrics = {k: float(v) for k, v in msg.content[protocol.METRICS].items()}
            (record.train if stage == "train" else record.sites)[site] = metrics
            good.append((site, msg))
        return [msg for _, msg in sorted(good, key=lambda pair: pair[0])]

    def latest_skipped(self) -> dict[str, dict[str, int]]:
        skipped: dict[str, dict[str, int]] = {}
        for number in sorted(self.rounds):
            skipped.update(self.rounds[number].skipped)
        return skipped

    def latest_ledgers(self) -> dict[str, dict[str, Any]]:
        """Each site's most recent privacy ledger summary."""
        ledgers: dict[str, dict[str, Any]] = {}
        for number in sorted(self.rounds):
            ledgers.update(self.rounds[number].privacy)
        return ledgers
