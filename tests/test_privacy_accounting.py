"""The site's privacy ledger: ε across rounds equals one continuous Opacus accountant."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import create_accountant

from privacy.accounting import (
    LedgerFileError,
    PrivacyLedger,
    default_delta,
    noise_multiplier_for,
)

DELTA = 1e-5


def continuous_epsilon(accountant: str, sigma: float, q: float, steps: int) -> float:
    """An independent Opacus accountant fed every step one by one, as one long run would."""
    opacus_accountant = create_accountant(mechanism=accountant)
    for _ in range(steps):
        opacus_accountant.step(noise_multiplier=sigma, sample_rate=q)
    return opacus_accountant.get_epsilon(delta=DELTA)


@pytest.mark.parametrize(("accountant", "expected", "tolerance"),
                         [("rdp", 6.7127, 1e-3), ("prv", 6.198, 0.02)])
def test_reference_values(accountant, expected, tolerance):
    # q = 0.01, σ = 1.0, 10 000 steps, δ = 1e-5 (shared/NOTES.md; PRV is Opacus's upper bound)
    ledger = PrivacyLedger(accountant=accountant, delta=DELTA, noise_multiplier=1.0,
                           sample_rate=0.01)
    assert ledger.record_round(10_000) == pytest.approx(expected, abs=tolerance)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_three_rounds_equal_one_continuous_accountant(accountant):
    sigma, q, k = 1.1, 0.02, 150
    ledger = PrivacyLedger(accountant=accountant, delta=DELTA, noise_multiplier=sigma,
                           sample_rate=q)
    for _ in range(3):
        ledger.record_round(k)
    assert ledger.history == [(sigma, q, 3 * k)]  # one entry: PRV stays cheap
    assert ledger.steps == 3 * k and ledger.rounds_trained == 3
    for round_number, epsilon in enumerate(ledger.epsilon_per_round, start=1):
        assert epsilon == pytest.approx(
            continuous_epsilon(accountant, sigma, q, round_number * k), abs=1e-6)
    assert ledger.epsilon() == ledger.epsilon_per_round[-1]
    assert ledger.epsilon_per_round == sorted(ledger.epsilon_per_round)
    # the history is Opacus's own: a PrivacyEngine's accountant loaded from it agrees
    engine_accountant = create_accountant(mechanism=accountant)
    engine_accountant.load_state_dict(ledger.accountant_state_dict())
    assert engine_accountant.history == ledger.history
    assert ledger.opacus_accountant().get_epsilon(delta=DELTA) == pytest.approx(
        ledger.epsilon(), abs=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_after_predicts_exactly_what_the_round_records(accountant):
    ledger = PrivacyLedger(accountant=accountant, delta=DELTA, noise_multiplier=0.9,
                           sample_rate=0.05)
    assert ledger.epsilon() == 0.0 and ledger.epsilon_after(0) == 0.0
    for steps in (40, 40, 25):
        predicted = ledger.epsilon_after(steps)
        before = list(ledger.history)
        assert ledger.history == before  # predicting spends nothing
        assert ledger.record_round(steps) == predicted
        assert ledger.epsilon() == predicted


def test_a_site_over_budget_declines_without_spending():
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA, noise_multiplier=1.0,
                           sample_rate=0.01, max_epsilon=2.0)
    rounds = 0
    while not ledger.exceeds_budget_after(200):
        ledger.record_round(200)
        rounds += 1
    spent = ledger.epsilon()
    ledger.record_declined()
    assert rounds == 4  # ε after 4·200 steps ≈ 1.93, after 5·200 ≈ 2.10
    assert spent <= 2.0 < ledger.epsilon_after(200)
    assert ledger.epsilon() == spent and ledger.steps == 200 * rounds
    assert (ledger.rounds_trained, ledger.rounds_declined) == (rounds, 1)
    assert len(ledger.epsilon_per_round) == rounds
    assert not PrivacyLedger("rdp", DELTA, 1.0, 0.01).exceeds_budget_after(10**6)  # no budget


def test_report_entry_has_the_ledger_fields():
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA, noise_multiplier=1.0,
                           sample_rate=0.01, max_epsilon=8.0)
    ledger.record_round(100)
    ledger.record_declined()
    report = ledger.report()
    assert report["dp"] is True and report["steps"] == 100
    assert report["epsilon"] == ledger.epsilon() > 0
    assert set(report) == {"dp", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                           "accountant", "max_epsilon", "rounds_trained", "rounds_declined",
                           "epsilon_per_round", "count_noise"}
    assert report["count_noise"] is None  # this ledger releases no count
    json.dumps(report, allow_nan=False)


def test_save_and_load_round_trip(tmp_path):
    ledger = PrivacyLedger(accountant="prv", delta=1e-6, noise_multiplier=1.2345678901234567,
                           sample_rate=1 / 37, max_epsilon=4.0)
    ledger.record_round(37)
    ledger.record_declined()
    ledger.record_round(37)
    path = tmp_path / "state" / "privacy_ledger.json"
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded == ledger
    assert loaded.history == [(1.2345678901234567, 1 / 37, 74)]  # floats survive exactly
    assert loaded.epsilon() == ledger.epsilon()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))) == ledger


def test_truncated_or_foreign_file_gives_a_clear_error(tmp_path):
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA, noise_multiplier=1.0, sample_rate=0.01)
    ledger.record_round(10)
    path = tmp_path / "privacy_ledger.json"
    ledger.save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LedgerFileError, match="privacy_ledger.json.*truncated"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({"format": "medsilo.privacy_ledger", "version": 1}))
    with pytest.raises(LedgerFileError, match="privacy_ledger.json.*missing"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(LedgerFileError, match="not a privacy ledger"):
        PrivacyLedger.load(path)


def test_a_failed_save_leaves_the_previous_ledger_intact(tmp_path):
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA, noise_multiplier=1.0, sample_rate=0.01)
    ledger.record_round(10)
    path = tmp_path / "privacy_ledger.json"
    ledger.save(path)
    saved = path.read_text()
    ledger.epsilon_per_round.append(float("nan"))  # not representable in strict JSON
    with pytest.raises(ValueError):
        ledger.save(path)
    assert path.read_text() == saved
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize(("target", "q", "steps", "accountant"), [
    (1.0, 0.01, 1000, "prv"),
    (8.0, 256 / 60000, 14040, "rdp"),
    (3.0, 0.02, 500, "rdp"),
])
def test_target_epsilon_gives_a_sigma_within_ten_percent_below_target(target, q, steps,
                                                                      accountant):
    sigma = noise_multiplier_for(target, DELTA, q, steps, accountant=accountant)
    epsilon = create_accountant(mechanism=accountant)
    epsilon.history = [(sigma, q, steps)]
    spent = epsilon.get_epsilon(delta=DELTA)
    assert 0.9 * target <= spent <= target
    # a ledger that trains the planned steps over several rounds ends at the same ε
    ledger = PrivacyLedger(accountant=accountant, delta=DELTA, noise_multiplier=sigma,
                           sample_rate=q)
    ledger.record_round(steps // 2)
    ledger.record_round(steps - steps // 2)
    # (ours composes at an FFT-friendly length: Opacus's number to ~1e-9 relative)
    assert ledger.epsilon() == pytest.approx(spent, rel=1e-8)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(accountant="gdp", delta=DELTA, noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(accountant="rdp", delta=0.0, noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(ValueError, match="steps"):
        PrivacyLedger("rdp", DELTA, 1.0, 0.01).record_round(-1)
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(0.0, DELTA, 0.01, 100)


@pytest.mark.parametrize(("n", "delta"), [
    (1, 1e-5), (303, 1e-5), (10_000, 1e-5), (10_001, 1e-6), (60_000, 1e-6),
    (100_000, 1e-6), (100_001, 1e-7),
])
def test_default_delta_is_a_power_of_ten_well_below_one_over_n(n, delta):
    assert default_delta(n) == delta
    assert default_delta(n) * n <= 0.1


def test_default_delta_needs_a_positive_count():
    with pytest.raises(ValueError):
        default_delta(0)
