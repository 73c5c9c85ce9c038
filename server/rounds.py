"""The federated round loop: Flower's ``Strategy.start``, made resumable and fault-tolerant, and
the one writer of each round's record (server/history.py ``RoundRecord``).

The body of each round is Flower's own (configure_train → send_and_receive → aggregate_train →
configure_evaluate → send_and_receive → aggregate_evaluate → server-side evaluation). Two
things ``Strategy.start`` cannot do and a multi-day collaboration needs:

- start at round ``first_round`` with a restored model and strategy state, keeping the real
  round numbers (sites derive their seeds from them, FedAdam its bias correction), so a
  resumed run equals an uninterrupted one;
- skip a round that has too few usable updates (timeouts, failures, rejected updates) instead
  of ending the run, and stop cleanly only when declined privacy budgets make further rounds
  impossible;
- stop at once when asked to (Ctrl-C, SIGTERM: server/stopping.py): the round in progress is
  dropped, the last complete round's checkpoint stands, and the run can be resumed from it.

The strategy (server/strategy.py) and secure aggregation (server/secure_aggregation.py) return
what they found (per-site statuses, rejections, the aggregate); this loop writes all of it into
the round's record. Once a round is complete, ``after_round`` is called (the checkpoint is
written there), then ``on_round`` with the finished record (progress).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from privacy import protocol
from server.history import RoundRecord, RunHistory, node_label
from server.secure_aggregation import SecureAggregate, SecureAggregation, SecureRound
from server.stopping import StopRequested
from server.strategy import ScreeningMixin, SiteReplies, TooFewSites, TrainScreening, read_replies

# (server_round, arrays) -> metrics of the global model on data the server may see; None: the
# server has none (deployment), and the sites' weighted mean stands for them
EvaluateFn = Callable[[int, ArrayRecord], Mapping[str, float] | None]
RoundCallback = Callable[[RoundRecord], None]


@dataclass
class RunOutcome:
    arrays: ArrayRecord
    stopped: str | None = None  # why the run ended before its last round, if it did
    interrupted: str | None = None  # the signal that stopped it (e.g. "SIGINT"), if one did


@dataclass(frozen=True)
class RoundSettings:
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    min_sites: int = 1
    secure_aggregation: SecureAggregation | None = None  # None: one plain train message a site


def run_rounds(
    strategy: ScreeningMixin,  # a Flower strategy from server.strategy.build_strategy
    grid: Grid,
    history: RunHistory,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    min_sites: int = 1,
    evaluate_fn: EvaluateFn | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    on_round: RoundCallback | None = None,
    secure_aggregation: SecureAggregation | None = None,
) -> RunOutcome:
    settings = RoundSettings(timeout, train_config, evaluate_config, min_sites,
                             secure_aggregation)
    # the initial model's server-side evaluation runs while round 1's sites train; it is in
    # history.initial_global before anything reads the history (the round's metrics, the
    # checkpoint, the report) or calls evaluate_fn again
    initial = (InitialEvaluation(evaluate_fn, arrays)
               if first_round == 1 and evaluate_fn is not None else None)
    outcome = None
    for server_round in range(first_round, num_rounds + 1):
        clock = time.perf_counter()
        record = history.rounds[server_round] = RoundRecord(server_round, started_at=time.time())
        try:
            arrays, stopped = _train(strategy, grid, history, record, arrays, settings)
        except TooFewSites as gone:  # a lost site is never waited for: stop, checkpointed
            record.skipped_round = stopped = str(gone)
        except StopRequested as stop:
            outcome = _interrupted(history, server_round, arrays, stop)
            break
        if stopped is not None:
            outcome = RunOutcome(arrays, stopped=stopped)
            break
        try:
            _evaluate(strategy, grid, history, record, arrays, settings)
        except TooFewSites as gone:  # the round's update stands; its evaluation could not run
            record.failures.append({"stage": "evaluate", "node_id": None, "reason": str(gone)})
        except StopRequested as stop:
            outcome = _interrupted(history, server_round, arrays, stop)
            break
        _collect(history, initial)  # before evaluate_fn runs again and the round is checkpointed
        initial = None
        record.global_metrics = _global_metrics(
            record, evaluate_fn(server_round, arrays) if evaluate_fn is not None else None)
        record.duration_s = time.perf_counter() - clock
        if after_round is not None:
            after_round(server_round, arrays)
        if on_round is not None:
            on_round(record)
    _collect(history, initial)  # round 1 stopped, or no round ran (first_round > num_rounds)
    return outcome if outcome is not None else RunOutcome(arrays)


class InitialEvaluation:
    """``evaluate_fn(0, arrays)`` on a thread of its own, started before round 1.

    The server used to score the initial model before sending round 1's first message: ~1 s
    at 1000 sites (the pool's sites written and read, scikit-learn imported, 2500 records
    scored) by which round 1 started later than Flower stock's (issue 18). The sites need
    nothing from it, so it now runs while they train. Same arrays, same function, same numbers;
    ``evaluate_fn`` is never called twice at once (the round's own evaluation waits for this)."""

    def __init__(self, evaluate_fn: EvaluateFn, arrays: ArrayRecord) -> None:
        self._metrics: Mapping[str, float] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(evaluate_fn, arrays),
                                        name="initial-evaluation", daemon=True)
        self._thread.start()

    def _run(self, evaluate_fn: EvaluateFn, arrays: ArrayRecord) -> None:
        try:
            self._metrics = evaluate_fn(0, arrays)
        except BaseException as err:  # raised where the result is read, as it was before
            self._error = err

    def result(self) -> dict[str, float] | None:
        """The metrics, once the evaluation has finished; its error, if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return _plain(self._metrics)


def _collect(history: RunHistory, initial: InitialEvaluation | None) -> None:
    if initial is not None:
        history.initial_global = initial.result()


def _interrupted(history: RunHistory, server_round: int, arrays: ArrayRecord,
                 stop: StopRequested) -> RunOutcome:
    """A stop asked for during ``server_round``: the round is dropped from the record (its
    replies never all came; the global model is the last complete round's)."""
    del history.rounds[server_round]
    done = server_round - 1
    kept = (f"round{'s 1-' if done > 1 else ' '}{done} complete and checkpointed" if done
            else "no round was complete, there is nothing to resume")
    return RunOutcome(arrays, stopped=f"stopped by {stop.reason} during round {server_round}; "
                                      f"{kept}", interrupted=stop.reason)


def _train(strategy: ScreeningMixin, grid: Grid, history: RunHistory, record: RoundRecord,
           arrays: ArrayRecord, settings: RoundSettings) -> tuple[ArrayRecord, str | None]:
    """The training step: the new global model, and why the run must stop (None: it goes on)."""
    messages = list(strategy.configure_train(record.round, arrays, settings.train_config, grid))
    record.asked = len(messages)
    secure, aggregate = None, None
    if settings.secure_aggregation is None:
        replies = list(grid.send_and_receive(messages, timeout=settings.timeout))
    else:
        secure = settings.secure_aggregation.exchange(grid, messages, settings.timeout)
        aggregate = _screen_secure_aggregate(strategy, secure)
        _record_secure_round(history, record, secure)
        replies = secure.replies
    if secure is None:
        _record_timeouts(history, record, [m.metadata.dst_node_id for m in messages], replies)
    else:  # who missed a stage: a site that answered every stage it was sent did not time out
        _record_timeouts(history, record, sorted(secure.timed_out), [])
    screening = strategy.screen_train(replies, with_updates=secure is None, sent=messages)
    _record_training(history, record, screening)
    if secure is not None:  # the ids of the replies as sent, as each site's egress log has them
        for site, content_id in secure.content_ids.items():
            record.received.setdefault(site, {})["train"] = content_id
    if secure is None:
        usable = len(screening.accepted)
    else:  # one aggregate stands for the sites it summed
        usable = len(secure.record.aggregated) if aggregate and secure.record else 0
    if usable < settings.min_sites:
        return arrays, _skip(record, screening.replies, usable, settings.min_sites)
    if aggregate is not None:
        aggregated = strategy.aggregate_secure(record.round, aggregate)
    else:
        aggregated = strategy.aggregate_updates(record.round, screening.accepted)
    return (aggregated if aggregated is not None else arrays), None


def _screen_secure_aggregate(strategy: ScreeningMixin, secure: SecureRound
                             ) -> SecureAggregate | None:
    """The secure mean, checked like a site's update (its norm and any rejection go to the
    round's secure aggregation record); None when aborted or rejected."""
    if secure.aggregate is None or secure.record is None:
        return None  # aborted: nothing was revealed
    screening = strategy.screen_secure(secure.aggregate)
    secure.record.update_norm, secure.record.rejected = screening.update_norm, screening.rejected
    return screening.accepted


def _skip(record: RoundRecord, replies: SiteReplies, usable: int, min_sites: int) -> str | None:
    """Too few usable updates: the global model stays as it was. The run stops (the reason is
    returned) only when the sites that declined for their privacy budget alone leave fewer than
    ``min_sites``: a spent budget never comes back; failed, rejected and late sites may."""
    secure = record.secure_aggregation or {}
    record.skipped_round = (
        f"round {record.round}: {usable} usable update(s), fewer than "
        f"min_sites={min_sites} (declined: {record.declined or 'none'}; "
        f"refused: {record.refused or 'none'}; "
        f"rejected: {record.rejected or 'none'}; failed: {len(record.failures)}; "
        f"timed out: {record.timed_out or 'none'}; secure aggregation aborted: "
        f"{secure.get('aborted') or 'no'}"
        + (f"; secure aggregate rejected: {secure['rejected']}" if secure.get("rejected")
           else "") + ")")
    could_train = (replies.count + len(record.timed_out) - len(record.declined)
                   - len(record.refused))
    return record.skipped_round if could_train < min_sites else None


def _evaluate(strategy: ScreeningMixin, grid: Grid, history: RunHistory, record: RoundRecord,
              arrays: ArrayRecord, settings: RoundSettings) -> None:
    messages = list(strategy.configure_evaluate(record.round, arrays, settings.evaluate_config,
                                                grid))
    if not messages:
        return
    replies = read_replies(grid.send_and_receive(messages, timeout=settings.timeout),
                           stage="evaluate", sent=messages)
    _record_replies(history, record, replies, stage="evaluate")
    record.sites.update(replies.metrics)
    record.site_weighted = strategy.weighted_evaluation(record.round, replies.ordered)


def _global_metrics(record: RoundRecord, metrics: Mapping[str, float] | None
                    ) -> dict[str, float]:
    if metrics is not None:
        return dict(metrics)
    # deployment: Flower's example-weighted mean of the sites' metrics
    return {k: v for k, v in record.site_weighted.items() if k != protocol.NUM_EXAMPLES}


def _plain(metrics: Mapping[str, float] | None) -> dict[str, float] | None:
    return dict(metrics) if metrics is not None else None


# --- writing into the round's record ---------------------------------------------------------

def _record_secure_round(history: RunHistory, record: RoundRecord, secure: SecureRound) -> None:
    record.failures.extend(secure.failures)
    history.node_sites.update(secure.node_sites)
    if secure.record is not None:
        record.secure_aggregation = asdict(secure.record)


def _record_timeouts(history: RunHistory, record: RoundRecord, asked: list[int],
                     replies: list[Message]) -> None:
    """Sites that were sent a message but did not answer before the round timeout."""
    answered = {msg.metadata.src_node_id for msg in replies}
    missing = [history.node_sites.get(node, node_label(node)) for node in asked
               if node not in answered]
    record.timed_out.extend(sorted(missing))


def _record_training(history: RunHistory, record: RoundRecord,
                     screening: TrainScreening) -> None:
    _record_replies(history, record, screening.replies, stage="train")
    record.train.update(screening.trained)
    record.rejected.update(screening.rejected)
    record.update_norms.update(screening.update_norms)


def _record_replies(history: RunHistory, record: RoundRecord, replies: SiteReplies,
                    stage: str) -> None:
    """What every site's reply of a stage said (its metrics go where the stage's do)."""
    record.failures.extend(replies.failures)
    history.node_sites.update(replies.node_sites)
    for site, content_id in replies.received.items():
        record.received.setdefault(site, {})[stage] = content_id
    record.skipped.update(replies.skipped)
    record.privacy.update(replies.privacy)
    record.declined.update(replies.declined)
    record.refused.update(replies.refused)
