"""A site's privacy ledger: what DP-SGD has spent on this hospital's records, across all rounds.

The guarantee a site signs off on is "(ε, δ)-DP for each patient record over the whole
collaboration", so the accountant must see every local step of every round, not one round at a
time (a fresh Opacus ``PrivacyEngine`` per round under-reports ε by about the number of rounds).
This module keeps that state in a small JSON-safe ledger; all accounting math is Opacus's own
(:mod:`opacus.accountants`), fed with the ledger's history of ``(σ, q, steps)``.

Invariants the ledger protects:

- σ and q are fixed per site for the whole run (σ from :func:`noise_multiplier_for`, computed
  once from the planned total steps), so the history stays ONE entry. PRV accounting cost grows
  quickly with distinct entries (≈0.09 s for 1 entry, 1.6 s for 10, 105 s for 100).
- The ε after round r equals what one continuous Opacus accountant gives for all steps so far:
  the history is merged exactly as ``IAccountant.step`` merges it.
- A round is declined BEFORE training, from :meth:`PrivacyLedger.epsilon_after`; the value it
  predicts is cached and is exactly what :meth:`PrivacyLedger.record_round` then records, so
  the PRV cost is paid once per round.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privacy.files import write_atomically

# Opacus is imported inside the functions that account, not here: the site's policy (which
# reads ACCOUNTANTS) also runs in processes that never train (a SuperNode starts one per
# message, secure-aggregation stages and refusals included), and Opacus takes most of a second.
if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

ACCOUNTANTS = ("prv", "rdp")
LEDGER_FORMAT = "medsilo.privacy_ledger"
LEDGER_VERSION = 1

# History entry exactly as Opacus stores it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]


class LedgerFileError(ValueError):
    """A ledger file that cannot be read back (truncated, corrupted, or not a ledger)."""


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _opacus_epsilon(accountant: str, history: list[HistoryEntry], delta: float) -> float:
    """ε of an Opacus accountant holding ``history``, with Opacus's default precision."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = [tuple(entry) for entry in history]
    return float(opacus_accountant.get_epsilon(delta=delta))


def _extend(history: list[HistoryEntry], noise_multiplier: float, sample_rate: float,
            steps: int) -> list[HistoryEntry]:
    """``history`` after ``steps`` more steps, merged exactly as ``IAccountant.step`` merges."""
    extended = list(history)
    if steps == 0:
        return extended
    if extended and extended[-1][0] == noise_multiplier and extended[-1][1] == sample_rate:
        sigma, q, done = extended.pop()
        extended.append((sigma, q, done + steps))
    else:
        extended.append((noise_multiplier, sample_rate, steps))
    return extended


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "prv",
    prefix: tuple[HistoryEntry, ...] = (),
) -> float:
    """σ for DP-SGD as :func:`_plain_noise_multiplier`; with ``prefix`` (mechanisms already
    charged to the ledger, e.g. the noisy count release), σ such that the WHOLE history
    ``prefix + [(σ, q, total_steps)]`` stays within ``target_epsilon`` (the same accountant
    composes them). The prefix costs little under PRV (σ=10 count: +0.013 at ε≈11)."""
    sigma = _plain_noise_multiplier(target_epsilon, delta, sample_rate, total_steps, accountant)
    if not prefix:
        return sigma
    goal = float(target_epsilon)
    for _ in range(4):
        joint = _opacus_epsilon(accountant, [*prefix, (sigma, float(sample_rate),
                                                       int(total_steps))], delta)
        if joint <= target_epsilon:
            return sigma
        goal -= (joint - target_epsilon) + 0.002 * target_epsilon
        if goal <= 0:
            break
        sigma = _plain_noise_multiplier(goal, delta, sample_rate, total_steps, accountant)
    raise RuntimeError(f"could not plan σ within ε={target_epsilon:.4g} after the mechanisms "
                       f"already charged ({list(prefix)}): they alone spend too much")


def _plain_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "prv",
) -> float:
    """σ such that ``total_steps`` steps at sample rate ``sample_rate`` spend ε ∈ [0.9·t, t].

    Call this ONCE per site for the whole planned run (``total_steps = rounds × local steps``);
    never per round (that is what ``make_private_with_epsilon`` would do, and it ignores what
    earlier rounds spent). The binary search is Opacus's ``get_noise_multiplier`` with a
    tolerance of 1 % of the target; the result is re-checked with the same accountant the
    ledger uses, so a ledger at ``total_steps`` reports exactly the checked ε.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if not (isinstance(target_epsilon, int | float) and target_epsilon > 0
            and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    total_steps = int(total_steps)

    from opacus.accountants.utils import get_noise_multiplier

    epsilon = math.inf
    sigma = math.nan
    for tolerance in (0.01 * target_epsilon, 0.001 * target_epsilon):
        try:
            sigma = float(get_noise_multiplier(
                target_epsilon=float(target_epsilon), target_delta=float(delta),
                sample_rate=float(sample_rate), steps=total_steps, accountant=accountant,
                epsilon_tolerance=tolerance,
            ))
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise RuntimeError(f"no noise multiplier reaches ε={target_epsilon:.4g} "
                               f"({accountant}, δ={delta}, q={sample_rate}, "
                               f"steps={total_steps}): {error}") from error
        epsilon = _opacus_epsilon(accountant, [(sigma, float(sample_rate), total_steps)], delta)
        if 0.9 * target_epsilon <= epsilon <= target_epsilon:
            return sigma
    raise RuntimeError(
        f"could not find a noise multiplier giving ε in [{0.9 * target_epsilon:.4g}, "
        f"{target_epsilon:.4g}] ({accountant}, δ={delta}, q={sample_rate}, steps={total_steps}); "
        f"last try σ={sigma:.6g} gave ε={epsilon:.6g}"
    )


def noisy_count(num_examples: int, count_noise: float, draw: float) -> int:
    """ñ = max(1, round(n + count_noise · draw)), ``draw`` a standard normal: the Gaussian
    mechanism on a count (sensitivity 1), charged as :func:`count_release_entries`."""
    return max(1, round(num_examples + count_noise * float(draw)))


def count_release_entries(count_noise: float | None) -> list[HistoryEntry]:
    """The count release as accountant history: one step of σ = count_noise at q = 1."""
    return [] if count_noise is None else [(float(count_noise), 1.0, 1)]


def default_delta(num_train_examples: int) -> float:
    """The δ a site uses when none is configured: ``min(1e-5, 10**-k)`` with ``10**-k ≤ 1/(10·n)``.

    Rule: the largest power of ten not above ``1/(10·n)`` for a site with ``n`` training
    records, and never looser than 1e-5. Why:

    - δ bounds the probability that the ε guarantee fails; over ``n`` records a union bound
      gives ``n·δ ≤ 0.1``, so δ is always well below 1/n (a δ near 1/n would allow a
      mechanism that publishes one random record in the clear).
    - 1e-5 is the conventional value in DP-SGD papers and Opacus examples, so small hospital
      sites (n < 10 000) report at the δ readers compare against, with ``n·δ ≤ 0.1`` anyway.
    - A power of ten reads plainly in a report and does not change when a site adds a few records.

    Examples: n=303 → 1e-5; n=10 000 → 1e-5; n=60 000 → 1e-6; n=100 001 → 1e-7.
    """
    if int(num_train_examples) != num_train_examples or num_train_examples < 1:
        raise ValueError(
            f"num_train_examples must be a positive integer, got {num_train_examples!r}")
    ten_n = 10 * int(num_train_examples)
    exponent = len(str(ten_n - 1))  # smallest k with 10**k >= 10·n, in exact integer arithmetic
    return min(1e-5, float(f"1e-{exponent}"))


@dataclass
class PrivacyLedger:
    """What one site has spent: Opacus history plus per-round bookkeeping for the report.

    ``history`` is exactly Opacus's ``accountant.history`` (list of ``(σ, q, steps)``);
    ``epsilon_per_round`` holds the cumulative ε after each TRAINED round (declined rounds
    spend nothing and add nothing). ``epsilon()`` of a ledger with no steps is 0.0: a DP-off
    run must be reported as "no differential privacy" by the caller, never as ε = 0.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_trained: int = 0
    rounds_declined: int = 0
    epsilon_per_round: list[float] = field(default_factory=list)
    max_epsilon: float | None = None
    # The site's size, released as a noisy count ñ = n + N(0, count_noise²) (sensitivity 1:
    # one patient more or less moves n by 1). ñ is drawn when the ledger is planned; the
    # Gaussian mechanism becomes the FIRST history entry (σ = count_noise, q = 1, one step) with
    # the first trained round, i.e. when ñ first leaves the site (as the update's weight), and is
    # composed with DP-SGD by the same accountant. Every number the site sends (weight, q,
    # steps, σ) derives from ñ, never n; before the charge the summary omits q and steps.
    count_noise: float | None = None
    released_count: int | None = None
    # ε already computed, keyed by the history it was computed for (PRV is slow; see module doc).
    _epsilon_cache: dict[tuple[HistoryEntry, ...], float] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        self.delta = _check_delta(self.delta)
        self.sample_rate = _check_sample_rate(self.sample_rate)
        if not (isinstance(self.noise_multiplier, int | float) and self.noise_multiplier > 0
                and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, "
                             f"got {self.noise_multiplier!r}")
        self.noise_multiplier = float(self.noise_multiplier)
        if self.max_epsilon is not None:
            if not (isinstance(self.max_epsilon, int | float) and self.max_epsilon > 0):
                raise ValueError(f"max_epsilon must be positive or None, got {self.max_epsilon!r}")
            self.max_epsilon = float(self.max_epsilon)
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        if self.count_noise is not None:
            if not (isinstance(self.count_noise, int | float) and self.count_noise > 0
                    and math.isfinite(self.count_noise)):
                raise ValueError(f"count_noise must be a positive finite number or None, "
                                 f"got {self.count_noise!r}")
            self.count_noise = float(self.count_noise)
        self.epsilon_per_round = [float(e) for e in self.epsilon_per_round]

    # ----------------------------------------------------------------------------- accounting
    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken at this site so far (every step, empty Poisson batches too)."""
        return sum(n for _, _, n in self.history) - self.count_charged

    @property
    def count_charged(self) -> bool:
        """Whether the noisy count has left the site (it is the history's first entry)."""
        return self.released_count is not None and bool(self.history)

    def count_entries(self) -> list[HistoryEntry]:
        """The count release as accountant history: ``[(count_noise, 1, 1)]``, or none."""
        return count_release_entries(self.count_noise)

    def _epsilon_of(self, history: list[HistoryEntry]) -> float:
        key = tuple(history)
        if key not in self._epsilon_cache:
            if len(self._epsilon_cache) >= 8:  # only the current and the next round matter
                self._epsilon_cache.clear()
            self._epsilon_cache[key] = _opacus_epsilon(self.accountant, history, self.delta)
        return self._epsilon_cache[key]

    def epsilon(self) -> float:
        """Cumulative ε spent so far at this ledger's δ (0.0 before any step)."""
        return self._epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """The cumulative ε if ``steps`` more steps were taken at the ledger's σ and q.

        Used to decline a round BEFORE training; :meth:`record_round` with the same ``steps``
        records exactly this value (cached, so PRV is computed once per round).
        """
        return self._epsilon_of(self._history_after(steps))

    def exceeds_budget_after(self, steps: int) -> bool:
        """True when ``max_epsilon`` is set and ``steps`` more steps would go past it."""
        return self.max_epsilon is not None and self.epsilon_after(steps) > self.max_epsilon

    def record_round(self, steps: int) -> float:
        """Record a trained round of ``steps`` DP-SGD steps; returns the new cumulative ε."""
        self.history = self._history_after(steps)
        epsilon = self.epsilon()
        self.epsilon_per_round.append(epsilon)
        self.rounds_trained += 1
        return epsilon

    def record_declined(self) -> None:
        """Record a round this site declined (it trained nothing and spent nothing)."""
        self.rounds_declined += 1

    def _history_after(self, steps: int) -> list[HistoryEntry]:
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        history = self.history
        if self.released_count is not None and not history and steps > 0:
            history = self.count_entries()  # the first trained round releases ñ
        return _extend(history, self.noise_multiplier, self.sample_rate, int(steps))

    def accountant_state_dict(self) -> dict[str, Any]:
        """The ledger as Opacus accountant state, for ``accountant.load_state_dict``."""
        return {"history": list(self.history), "mechanism": self.accountant}

    def opacus_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's history (e.g. to cross-check ε)."""
        from opacus.accountants import create_accountant

        opacus_accountant = create_accountant(mechanism=self.accountant)
        opacus_accountant.load_state_dict(self.accountant_state_dict())
        return opacus_accountant

    def report(self) -> dict[str, Any]:
        """The ``privacy.<site>`` entry of report.json for a DP site."""
        # before ñ is charged, q (a function of ñ) does not leave the site
        hidden = self.released_count is not None and not self.count_charged
        return {
            "dp": True,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": None if hidden else self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant,
            "max_epsilon": self.max_epsilon,
            "rounds_trained": self.rounds_trained,
            "rounds_declined": self.rounds_declined,
            "epsilon_per_round": list(self.epsilon_per_round),
            # the site's size is released noisy (count_noise) and accounted, or exactly (None)
            "count_noise": self.count_noise,
        }

    # ---------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (history entries become ``[σ, q, steps]`` lists)."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "history": [[s, q, n] for s, q, n in self.history],
            "rounds_trained": self.rounds_trained,
            "rounds_declined": self.rounds_declined,
            "epsilon_per_round": list(self.epsilon_per_round),
            "max_epsilon": self.max_epsilon,
            "count_noise": self.count_noise,
            "released_count": self.released_count,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(state, dict):
            raise ValueError(f"a privacy ledger is a JSON object, got {type(state).__name__}")
        if state.get("format") != LEDGER_FORMAT:
            raise ValueError(f"not a privacy ledger (format={state.get('format')!r})")
        if state.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported privacy ledger version {state.get('version')!r}")
        required = ("accountant", "delta", "noise_multiplier", "sample_rate", "history",
                    "rounds_trained", "rounds_declined", "epsilon_per_round", "max_epsilon")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"privacy ledger is missing {missing}")
        history = state["history"]
        if not isinstance(history, list) or not all(
                isinstance(e, list | tuple) and len(e) == 3 for e in history):
            raise ValueError("privacy ledger history must be a list of [sigma, q, steps] entries")
        for key in ("rounds_trained", "rounds_declined"):
            if not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"privacy ledger {key} must be a non-negative integer")
        if not isinstance(state["epsilon_per_round"], list):
            raise ValueError("privacy ledger epsilon_per_round must be a list")
        return cls(
            accountant=state["accountant"],
            delta=state["delta"],
            noise_multiplier=state["noise_multiplier"],
            sample_rate=state["sample_rate"],
            history=[(float(s), float(q), int(n)) for s, q, n in history],
            rounds_trained=state["rounds_trained"],
            rounds_declined=state["rounds_declined"],
            epsilon_per_round=state["epsilon_per_round"],
            max_epsilon=state["max_epsilon"],
            count_noise=state.get("count_noise"),
            released_count=state.get("released_count"),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger atomically: a temp file in the same directory, then ``os.replace``.

        A crash (or a SuperNode restart) mid-save leaves either the old ledger or the new one,
        never a half-written file: losing spent budget would under-report ε.
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        write_atomically(path, text.encode("utf-8"), mode=0o600)  # the site's alone

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; :class:`LedgerFileError` names the file if bad.

        A missing file raises ``FileNotFoundError`` (a site that has not trained yet).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as error:
            raise LedgerFileError(f"cannot read privacy ledger {path}: {error}") from error
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise LedgerFileError(
                f"privacy ledger {path} is not valid JSON (truncated or corrupted?): {error}"
            ) from error
        try:
            return cls.from_dict(state)
        except (ValueError, TypeError) as error:
            raise LedgerFileError(f"privacy ledger {path} is malformed: {error}") from error


