"""What happened in each round, per site: the raw material of the report.

server/rounds.py writes every round's record; the report (server/report.py) and the
checkpoint (server/checkpoint.py) read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message


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
    secure_aggregation: dict[str, Any] | None = None  # secure_aggregation.SecureRoundRecord
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

    def round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

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


def destinations(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> the node it was sent to (ids are set when the grid pushes a message)."""
    return {msg.metadata.message_id: msg.metadata.dst_node_id for msg in sent
            if msg.metadata.message_id}


def replier(reply: Message, sent_to: Mapping[str, int] | None = None) -> int:
    """The node a reply answers for. An error reply made by Flower itself (a node that stopped
    sending heartbeats, a reply whose upload never completed) comes from the SuperLink or the
    server's own node: it stands for the node the message was sent to (``sent_to``:
    :func:`destinations` of the messages sent)."""
    return (sent_to or {}).get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
