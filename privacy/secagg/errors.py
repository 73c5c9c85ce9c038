"""What can go wrong in a secure-aggregation round, as exceptions a driver can tell apart.

- :class:`SecAggProtocolError` — a message is malformed, out of order, from a participant that
  has no business sending it, from another session (a replay), or was altered in transit. It
  names the participant and what was expected. The offending message is never used.
- :class:`ShareDecryptionError` — the special case of a share ciphertext that fails AEAD
  authentication at the receiving site (tampered, replayed from another round, or misrouted).
- :class:`RevealRefused` — a site is asked to reveal both the self-mask share and the mask-key
  share of the same participant; together they would unmask that participant's input
  (Bonawitz et al. 2017, §4, Round 4), so an honest site refuses.
- :class:`SecAggAborted` — too few participants remain for the round to finish safely. Raised
  BEFORE anything is reconstructed, so nothing partial is revealed; the driver reports it and
  goes on with the next round.
"""

from __future__ import annotations


class SecAggProtocolError(ValueError):
    """A stage message that breaks the protocol; ``participant`` is the index it came from/for."""

    def __init__(self, message: str, participant: int | None = None) -> None:
        super().__init__(message)
        self.participant = participant


class ShareDecryptionError(SecAggProtocolError):
    """A share ciphertext from ``participant`` (the sender) failed authentication."""


class RevealRefused(SecAggProtocolError):
    """A site refuses to reveal both secrets of ``participant`` (that would reveal its input)."""


class SecAggAborted(RuntimeError):
    """The round cannot complete: at ``stage``, ``available`` < ``required`` for some secret."""

    def __init__(self, stage: str, message: str, *, required: int | None = None,
                 available: int | None = None) -> None:
        super().__init__(f"secure aggregation aborted at stage '{stage}': {message}")
        self.stage = stage
        self.required = required
        self.available = available
