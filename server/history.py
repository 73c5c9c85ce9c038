"""What happened in each round, per site: the raw material of the report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from privacy import protocol


@dataclass
class RoundRecord:
    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> train metrics
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> eval metrics
    global_metrics: dict[str, float] | None = None
    site_weighted: dict[str, float] = field(default_factory=dict)  # Flower's aggregate of `sites`
    failures: list[dict[str, Any]] = field(default_factory=list)  # replies that carried errors
    declined: dict[str, str] = field(default_factory=dict)  # site -> why it did not train
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> ledger summary
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> reason -> count


@dataclass
class RunHistory:
    initial_global: dict[str, float] | None = None
    rounds: dict[int, RoundRecord] = field(default_factory=dict)

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
            skipped = {k[len(protocol.SKIPPED_PREFIX):]: int(v) for k, v in status.items()
                        if k.startswith(protocol.SKIPPED_PREFIX)}
            if skipped:
                record.skipped[site] = skipped
            if protocol.PRIVACY in msg.content:
                record.privacy[site] = protocol.decode_ledger(msg.content[protocol.PRIVACY])
            if status.get(protocol.STATUS, protocol.STATUS_OK) == protocol.STATUS_DECLINED:
                record.declined[site] = str(status.get(protocol.REASON, "declined"))
                continue  # a declined site is left out of aggregation, never a zero update
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
