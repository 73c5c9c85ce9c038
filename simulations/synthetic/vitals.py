"""Vitals: synthetic ICU hospitals in the PhysioNet 2012 layout, and pooled datasets (either
vitals format) dealt out to sites, both read by the vitals loader (``client/tasks/vitals.py``).
The generator draws from the loader's own physiology table (``PHYSIOLOGY``), so what it writes
falls inside the limits the loader checks."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.tasks import DataError
from client.tasks.vitals import (
    DESCRIPTORS,
    ICU_TYPES,
    MISSING,
    PHYSIOLOGY,
    LabelRow,
    Observations,
    file_name,
    is_test_stay,
    number_text,
    read_labels,
    read_long_csv,
    read_physionet_record,
    site_format,
    variable_names,
)
from simulations.synthetic.base import PooledRecords, SiteGenerator, SiteProfile
from simulations.synthetic.registry import register_generator


@register_generator
class VitalsGenerator(SiteGenerator):
    name = "vitals"

    # -- pooled datasets (data.path): one stay per labels/outcomes row, in file order

    def _pooled_rows(
        self, path: Path, task_cfg: Mapping[str, Any]
    ) -> tuple[str, dict[str, LabelRow]]:
        fmt = site_format(Path(path), task_cfg)
        num_classes = int(task_cfg["spec"]["num_classes"])
        if fmt == "physionet":
            return fmt, read_labels(path / file_name(task_cfg, "outcomes_file"), "RecordID",
                                    str(task_cfg.get("label_column", "In-hospital_death")),
                                    num_classes)
        return fmt, read_labels(path / file_name(task_cfg, "labels_file"), "stay_id", "label",
                                num_classes)

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        path = Path(path)
        fmt, rows = self._pooled_rows(path, task_cfg)
        fraction = float(task_cfg.get("test_fraction", 0.25))
        groups = None
        if site_column:
            groups = np.array(self._groups(path, task_cfg, fmt, rows, site_column), dtype=object)
        return PooledRecords(
            labels=np.array([r.label for r in rows.values()], dtype=np.int64),
            is_test=np.array([is_test_stay(s, fraction) for s in rows], dtype=bool),
            groups=groups,
        )

    def _groups(self, path: Path, task_cfg: Mapping[str, Any], fmt: str,
                rows: Mapping[str, LabelRow], column: str) -> list[str]:
        """A stay's site: a column of the outcomes/labels file, or a static descriptor
        (e.g. ``ICUType``) read from the stay's record."""
        first = next(iter(rows.values()), None)
        if first is not None and column in first.fields:
            return [r.fields[column] for r in rows.values()]
        if fmt == "physionet" and column in DESCRIPTORS and column != "RecordID":
            observations = Observations({**task_cfg, "static": [column]}, Counter())
            out = []
            for stay_id in rows:
                record = path / file_name(task_cfg, "records_dir") / f"{stay_id}.txt"
                value = (read_physionet_record(record, observations).static.get(column)
                         if record.is_file() else None)
                out.append("missing" if value is None else number_text(value))
            return out
        if fmt == "long_csv":
            observations = Observations({**task_cfg, "static": [column]}, Counter())
            stays = read_long_csv(path / file_name(task_cfg, "events_file"), observations)
            return [("missing" if s not in stays or column not in stays[s].static
                     else number_text(stays[s].static[column])) for s in rows]
        raise DataError(f"{path}: data.site_column={column!r} is neither a column of the "
                        f"labels/outcomes file nor a static descriptor of the records")

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        path, folder = Path(path), Path(folder)
        fmt, rows = self._pooled_rows(path, task_cfg)
        ids = list(rows)
        chosen = [ids[int(i)] for i in np.sort(np.asarray(records))]
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "physionet":
            outcomes = path / file_name(task_cfg, "outcomes_file")
            _copy_rows(outcomes, folder / outcomes.name, {rows[s].lineno for s in chosen})
            source, target = (path / file_name(task_cfg, "records_dir"),
                              folder / file_name(task_cfg, "records_dir"))
            target.mkdir(exist_ok=True)
            for stay_id in chosen:
                if (source / f"{stay_id}.txt").is_file():
                    shutil.copyfile(source / f"{stay_id}.txt", target / f"{stay_id}.txt")
            return
        labels = path / file_name(task_cfg, "labels_file")
        _copy_rows(labels, folder / labels.name, {rows[s].lineno for s in chosen})
        keep = set(chosen)
        events = path / file_name(task_cfg, "events_file")
        with events.open(newline="", encoding="utf-8-sig") as src, \
                (folder / events.name).open("w", newline="") as dst:
            reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
            header = next(reader, [])
            writer.writerow(header)
            at = [h.strip() for h in header].index("stay_id")
            writer.writerows(row for row in reader if row and row[at].strip() in keep)

    # -- synthetic hospitals

    def site_profiles(
        self, task_cfg: Mapping[str, Any], num_sites: int, seed: int
    ) -> list[SiteProfile]:
        """Sizes and shifts as for every task; mortality around ``synthetic.mortality``
        (PhysioNet 2012 set-a: 13.9 %), varying between hospitals by Beta(alpha*m, alpha*(1-m))."""
        synth = task_cfg["synthetic"]
        mortality = float(synth.get("mortality", 0.14))
        alpha = float(synth.get("label_alpha", 30.0))
        rng = np.random.default_rng([seed, 7919, 2])
        profiles = []
        for profile in super().site_profiles(task_cfg, num_sites, seed):
            p = float(np.clip(rng.beta(alpha * mortality, alpha * (1 - mortality)), 0.03, 0.6))
            weights = (1.0 - p, p) + (0.0,) * (int(task_cfg["spec"]["num_classes"]) - 2)
            profiles.append(SiteProfile(profile.index, profile.num_train, profile.num_test,
                                        weights, profile.shift))
        return profiles

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        write_synthetic_physionet(Path(folder), task_cfg, profile, seed)


def _copy_rows(source: Path, target: Path, keep_lines: set[int]) -> None:
    """Header + the chosen data lines of a CSV, verbatim (``LabelRow.lineno`` numbering)."""
    with source.open(newline="", encoding="utf-8-sig") as src, target.open("w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
        writer.writerow(next(reader, []))
        for row in reader:
            if reader.line_num in keep_lines:
                writer.writerow(row)


# --------------------------------------------------------------------------- synthetic data

# How often each kind of variable is charted, in hours between measurements (before the
# site's frequency factor): bedside vitals hourly, neuro checks every 4 h, lab panels and
# blood gases a few times a day.
CHART_INTERVAL_H = {"vital": 1.0, "art": 1.0, "neuro": 4.0, "lab": 12.0, "gas": 8.0,
                    "other": 2.0}
EXTRA_PARAMETERS = ("Urine", "MechVent")  # written to every file, not features by default
OUTCOME_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"


def write_synthetic_physionet(folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile,
                              seed: int) -> None:
    """One synthetic hospital in the PhysioNet 2012 layout.

    Each stay has a latent state z(t): an admission acuity that resolves over the stay plus,
    for patients who die, a deterioration that starts at a random hour and grows; variables move
    with z in their clinical direction (HR, lactate up; MAP, GCS, pH down) on top of each
    patient's own baseline, autocorrelated drift and measurement noise. Some survivors also
    deteriorate and some deaths do not, so the signal is real but imperfect. Sicker patients
    get more blood gases (informative missingness, as in real ICUs).

    The site shift (``profile.shift``): ``u`` sets how often things are charted (x0.6..x2),
    ``v`` the share of patients with an arterial line (invasive MAP/SysABP/DiasABP), ``w`` the
    lab policy (how often lactate is measured) and a thermometer offset.
    """
    variables = variable_names(task_cfg)
    unknown = [v for v in variables if v not in PHYSIOLOGY]
    if unknown:
        raise ValueError(f"the synthetic generator has no physiology for {unknown}; "
                         f"it knows {sorted(PHYSIOLOGY)}")
    hours = int(task_cfg.get("hours", 48))
    rng = np.random.default_rng([seed, profile.index, 2])
    shift = profile.shift
    site = {
        "interval_factor": 0.6 * (2.0 / 0.6) ** shift["u"],
        "art_line": 0.35 + 0.55 * shift["v"],
        "lactate_rate": 0.3 + 0.65 * shift["w"],
        "temp_offset": 0.6 * (shift["w"] - 0.5),
        "icu_mix": rng.dirichlet(np.array([15.0, 21.0, 36.0, 28.0]) / 4),
    }
    mortality = float(profile.class_weights[1])
    n = profile.num_train + profile.num_test
    first_id = 132539 + 20000 * profile.index  # set-a record ids start at 132539
    parameters = list(dict.fromkeys([*variables, *EXTRA_PARAMETERS]))
    records = folder / file_name(task_cfg, "records_dir")
    records.mkdir(parents=True, exist_ok=True)
    outcome_lines = [OUTCOME_HEADER]
    for i in range(n):
        record_id = first_id + i
        died = bool(rng.random() < mortality)
        lines, outcome = _synthetic_stay(record_id, died, parameters, hours, site, rng)
        (records / f"{record_id}.txt").write_text("\n".join(lines) + "\n")
        outcome_lines.append(outcome)
    (folder / file_name(task_cfg, "outcomes_file")).write_text("\n".join(outcome_lines) + "\n")


def _fmt(value: float, decimals: int) -> str:
    if value == MISSING:
        return "-1"  # the challenge files write missing as a bare -1
    return f"{value:.{decimals}f}" if decimals else str(round(value))


def _chart_times(rng: np.random.Generator, mean_interval_h: float, hours: int) -> np.ndarray:
    """Minutes since admission of an irregular charting process (first one early)."""
    count = int(hours / mean_interval_h * 1.6) + 3
    gaps = rng.exponential(mean_interval_h * 60.0, size=count)
    gaps[0] = rng.uniform(0, min(mean_interval_h, 3.0) * 60.0)
    minutes = np.cumsum(gaps).astype(np.int64)
    return minutes[minutes < hours * 60]


def _synthetic_stay(record_id: int, died: bool, parameters: Sequence[str], hours: int,
                    site: Mapping[str, Any], rng: np.random.Generator) -> tuple[list[str], str]:
    age = float(np.clip(rng.normal(70 if died else 62, 15), 16, 90))
    icu_type = int(rng.choice(ICU_TYPES, p=site["icu_mix"]))
    height = rng.normal(170, 10) if rng.random() > 0.47 else MISSING  # ~half unrecorded
    weight = rng.normal(82, 20) if rng.random() > 0.08 else MISSING
    gender = float(rng.random() < 0.56) if rng.random() > 0.001 else MISSING
    lines = ["Time,Parameter,Value", f"00:00,RecordID,{record_id}", f"00:00,Age,{age:.0f}",
             f"00:00,Gender,{_fmt(gender, 0)}", f"00:00,Height,{_fmt(height, 1)}",
             f"00:00,ICUType,{icu_type}", f"00:00,Weight,{_fmt(weight, 1)}"]

    # Latent deterioration z(t), in sd units of each variable.
    acuity = rng.normal(0.4 if died else 0.0, 0.8)
    deteriorates = rng.random() < (0.85 if died else 0.12)
    strength = rng.uniform(0.8, 2.0) if deteriorates else 0.0
    onset = rng.uniform(0, hours * 0.6)
    t = np.arange(hours * 60, dtype=np.float64) / 60.0  # minute grid, in hours

    def latent(at_minutes: np.ndarray) -> np.ndarray:
        th = t[at_minutes]
        ramp = np.clip((th - onset) / (hours - onset), 0, 1)
        return acuity * np.exp(-th / 24.0) + strength * ramp

    events: list[tuple[int, int, str]] = []  # (minute, order, line)
    art_line = rng.random() < site["art_line"] + (0.1 if died else 0.0)
    gas_interval = CHART_INTERVAL_H["gas"] * (0.6 if died or acuity > 1 else 1.0)
    shared_times = {
        "art": _chart_times(rng, CHART_INTERVAL_H["art"] * site["interval_factor"], hours)
        if art_line else np.zeros(0, dtype=np.int64),
        "lab": _chart_times(rng, CHART_INTERVAL_H["lab"] * site["interval_factor"], hours),
        "gas": _chart_times(rng, gas_interval * site["interval_factor"], hours)
        if rng.random() < 0.4 + 0.4 * art_line else np.zeros(0, dtype=np.int64),
        "vital": _chart_times(rng, CHART_INTERVAL_H["vital"] * site["interval_factor"], hours),
    }
    for order, name in enumerate(parameters):
        phys = PHYSIOLOGY[name]
        if name == "MechVent":
            if rng.random() < 0.6:
                times = _chart_times(rng, 6.0, hours)
                events += [(int(m), order, f"{m // 60:02d}:{m % 60:02d},MechVent,1")
                           for m in times]
            continue
        if name == "Weight":  # daily weights, as a time series
            times = _chart_times(rng, 24.0, hours)
        elif name == "Temp":
            times = _chart_times(rng, 4.0 * site["interval_factor"], hours)
        elif name == "Lactate" and rng.random() > site["lactate_rate"]:
            times = np.zeros(0, dtype=np.int64)  # this hospital did not order lactate
        elif phys.kind in shared_times:
            times = shared_times[phys.kind]
            if phys.kind in ("lab", "gas"):  # not every test of a panel is run every time
                times = times[rng.random(len(times)) < 0.9]
        else:
            times = _chart_times(rng, CHART_INTERVAL_H[phys.kind] * site["interval_factor"],
                                 hours)
        if len(times) == 0:
            continue
        z = latent(times)
        drift = np.cumsum(rng.normal(0, 0.15, len(times)))  # slow autocorrelated wander
        baseline = rng.normal(0, 0.6)
        noise = rng.normal(0, 0.35, len(times))
        level = baseline + phys.worsens * z + drift + noise  # in sd units
        if phys.log:
            values = np.exp(np.log(phys.mean) + phys.sd * level)
        else:
            values = phys.mean + phys.sd * level
        if name == "Temp":
            values = values + site["temp_offset"]
        if name == "GCS":  # sedation: some patients sit low from the start
            values = np.round(values - (rng.random() < 0.25) * 3)
        values = np.clip(values, phys.low, phys.high)
        if name == "SaO2":
            values = np.minimum(values, 100)
        # Messiness seen in the real files: a missing marker now and then, and entry errors
        # (a decimal point lost) that the loader must drop as implausible.
        glitch = rng.random(len(times))
        for minute, value, g in zip(times, values, glitch, strict=True):
            if g < 0.002:
                text = "-1"
            elif g < 0.004:
                text = _fmt(value * 100, 0)
            else:
                text = _fmt(value, phys.decimals)
            stamp = f"{minute // 60:02d}:{minute % 60:02d}"
            events.append((int(minute), order, f"{stamp},{name},{text}"))
    events.sort()
    lines += [line for _, _, line in events]

    severity = acuity + (strength if died else 0.5 * strength)
    saps = int(np.clip(round(14 + 3 * severity + rng.normal(0, 3)), 0, 40))
    sofa = int(np.clip(round(5 + 2.5 * severity + rng.normal(0, 2)), 0, 24))
    stay_days = int(max(2, round(rng.lognormal(np.log(8), 0.6))))
    survival = (int(rng.integers(2, stay_days + 1)) if died
                else (int(rng.integers(stay_days + 1, 400)) if rng.random() < 0.15 else -1))
    saps_text = "-1" if rng.random() < 0.03 else str(saps)
    outcome = f"{record_id},{saps_text},{sofa},{stay_days},{survival},{int(died)}"
    return lines, outcome
