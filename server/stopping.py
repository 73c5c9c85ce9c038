"""Clean stops: a stop asked for while the rounds run (Ctrl-C, SIGTERM) ends the run at its next
wait for the sites, never in the middle of writing a checkpoint or the report; and waits for
replies that end when they should.

Whoever owns the process's signals (the simulation's command line, ``simulations/run.py``)
calls :meth:`StopSignal.request`; the ServerApp talks to the sites through a
:class:`StoppableGrid`, whose every call raises :class:`StopRequested` once a stop was asked
for. The round in progress is dropped (its replies never all came), the last complete round's
checkpoint stands, and the report says why the run stopped and how to continue it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from privacy import compat

# how often a wait for replies looks at the stop signal (Flower's own grids poll every 0.1-3 s)
POLL_S = 0.1


class StopRequested(Exception):
    """Raised out of a grid call once a stop was requested; ``reason`` names the signal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StopSignal:
    """A stop asked for once, by a signal handler or another thread; read by the rounds.

    ``finished`` is set by the ServerApp once its report is written (whether or not a stop was
    asked for): from then on nothing is lost if the process ends. ``before_exit``: what the
    owner of the signals prints when it has to end the process before the engine has shut down.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None  # e.g. "SIGINT"
        self.finished = threading.Event()
        self.before_exit: Callable[[], None] | None = None

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise StopRequested(self.reason or "stop requested")


class StoppableGrid(Grid):
    """``grid`` for the rounds: a wait for replies ends at its timeout after one last pull (so
    that no reply that came during a slow pull is lost), or at once, raising
    :class:`StopRequested`, when ``stop`` is requested (every call checks it). ``poll_s``: how
    often a wait pulls (Flower's deployed grid: every 3 s). Simulated, a wait also pulls as soon
    as a reply is stored (``compat.reply_signal``): a secure round's five stages each waited
    half a poll on average for their last reply."""

    def __init__(self, grid: Grid, stop: StopSignal | None = None, poll_s: float = POLL_S) -> None:
        self._grid, self._stop, self._poll_s = grid, stop, poll_s
        self._arrived = compat.reply_signal(grid)  # None: only polls

    # the Run type lives in a Flower module that is not public (tests/test_compat.py)
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def _check(self) -> None:
        if self._stop is not None:
            self._stop.check()

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's send-and-receive loop (push, then pull until every reply came or
        ``timeout``), polling the stop signal between pulls."""
        pending = set(self.push_messages(messages)) - {None}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            last = end is not None and time.monotonic() >= end
            if self._arrived is not None:
                self._arrived.clear()  # before pulling: a reply stored from now on wakes the wait
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if last:
                break
            if pending:
                wait = (self._poll_s if end is None
                        else max(0.0, min(self._poll_s, end - time.monotonic())))
                if self._arrived is not None:
                    self._arrived.wait(wait)
                else:
                    time.sleep(wait)
        return replies
