"""Vitals: ICU stay -> in-hospital mortality from irregular multivariate time series.

Two site formats (``task.format``: ``physionet``, ``long_csv`` or ``auto``):

- the PhysioNet/CinC Challenge 2012 layout, as the download unpacks:
  ``<records_dir>/<RecordID>.txt`` (default ``set-a/``), one file per ICU stay with header
  ``Time,Parameter,Value``; ``Time`` is ``HH:MM`` since ICU admission (hours may exceed 23);
  the first lines are the static descriptors (RecordID, Age, Gender, Height, ICUType, Weight)
  at ``00:00``; ``-1`` means missing. Next to it ``<outcomes_file>`` (default
  ``Outcomes-a.txt``) with header ``RecordID,SAPS-I,SOFA,Length_of_stay,Survival,
  In-hospital_death``; the label is ``task.label_column``. The synthetic generator
  (``simulations/synthetic/vitals.py``) writes exactly this layout.
- a generic long CSV ``<events_file>`` (``stay_id,time_hours,variable,value``) and
  ``<labels_file>`` (``stay_id,label``). Rows whose ``variable`` is a static descriptor
  (``task.static``) give the stay's static features; an empty, ``NaN`` or ``-1`` value is missing.

Each stay becomes two tensors: ``series`` (hours x 3V: per variable the standardised value
carried forward, the observed mask, and the hours since the last observation / ``hours``) over
the first ``task.hours`` hours, and ``static`` (descriptors, each with a missing flag;
ICUType one-hot over the four challenge units). Standardisation (``task.standardize``):
``reference`` takes each variable's mean/sd from ``task.reference`` (outside data: a stay's
tensors then depend on that stay alone, as DP-SGD needs), ``site`` from the site's own
training split (every training stay moves every other one's values), ``auto`` is reference
under privacy=dp and site otherwise. Train/test is a stable hash of the stay id, so a stay keeps
its split whichever folder it is copied into.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.tasks.base import (
    DataError,
    SiteData,
    Task,
    read_text_file,
    reference_stats,
    standardize_mode,
    text_lines,
)
from client.tasks.registry import register_task

FORMATS = ("auto", "physionet", "long_csv")
RECORD_HEADER = ("Time", "Parameter", "Value")
EVENT_COLUMNS = ("stay_id", "time_hours", "variable", "value")
LABEL_COLUMNS = ("stay_id", "label")
# The PhysioNet 2012 general descriptors, recorded once at 00:00 at the top of each file.
DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")
# ICUType codes fixed by the challenge (1 coronary care, 2 cardiac surgery recovery,
# 3 medical, 4 surgical): the one-hot encoding is data-independent.
ICU_TYPES = (1, 2, 3, 4)
MISSING = -1.0


@dataclass(frozen=True)
class Physiology:
    """What a variable looks like in an adult ICU: the loader drops values outside
    ``[low, high]`` (entry errors such as a pH of 735), standardises ``log`` variables on a log
    scale (skewed labs), and the synthetic generator (``simulations/synthetic/vitals.py``) draws
    around ``mean`` +- ``sd``: one table, so the loader's limits fit what the generator writes."""

    low: float
    high: float
    mean: float
    sd: float
    log: bool = False
    decimals: int = 0
    worsens: float = 0.0  # generator: change per unit of deterioration, in sd (sign = direction)
    kind: str = "vital"  # generator: vital | art (arterial line) | neuro | lab | gas | other


PHYSIOLOGY: dict[str, Physiology] = {
    "HR": Physiology(10, 300, 87, 15, worsens=+1.0),
    "RespRate": Physiology(1, 90, 19, 5, worsens=+0.9),
    "Temp": Physiology(25, 45, 37.0, 0.7, decimals=1, worsens=+0.4),
    "MAP": Physiology(10, 250, 80, 12, worsens=-1.0, kind="art"),
    "SysABP": Physiology(20, 300, 120, 18, worsens=-1.0, kind="art"),
    "DiasABP": Physiology(5, 200, 60, 10, worsens=-0.8, kind="art"),
    "GCS": Physiology(3, 15, 12, 3.5, worsens=-1.0, kind="neuro"),
    "Lactate": Physiology(0.1, 40, 2.0, 0.45, log=True, decimals=1, worsens=+1.3, kind="gas"),
    "pH": Physiology(6.5, 8.0, 7.39, 0.06, decimals=2, worsens=-0.9, kind="gas"),
    "SaO2": Physiology(40, 100, 97, 2.5, worsens=-0.6, kind="gas"),
    "PaO2": Physiology(20, 600, 140, 60, worsens=-0.5, kind="gas"),
    "PaCO2": Physiology(10, 150, 40, 8, worsens=+0.3, kind="gas"),
    "HCO3": Physiology(5, 55, 24, 4, worsens=-0.8, kind="lab"),
    "Creatinine": Physiology(0.1, 25, 1.2, 0.5, log=True, decimals=1, worsens=+0.7, kind="lab"),
    "BUN": Physiology(1, 250, 25, 0.55, log=True, worsens=+0.7, kind="lab"),
    "WBC": Physiology(0.1, 200, 11, 0.4, log=True, decimals=1, worsens=+0.6, kind="lab"),
    "Glucose": Physiology(10, 1500, 135, 0.3, log=True, worsens=+0.3, kind="lab"),
    "Platelets": Physiology(1, 2000, 200, 0.45, log=True, worsens=-0.6, kind="lab"),
    "HCT": Physiology(10, 70, 31, 5, decimals=1, worsens=-0.3, kind="lab"),
    "K": Physiology(1, 10, 4.1, 0.6, decimals=1, worsens=+0.3, kind="lab"),
    "Na": Physiology(100, 180, 139, 5, worsens=+0.1, kind="lab"),
    "Mg": Physiology(0.5, 6, 2.0, 0.4, decimals=1, kind="lab"),
    "FiO2": Physiology(0.21, 1.0, 0.5, 0.15, decimals=2, worsens=+0.8, kind="gas"),
    "Urine": Physiology(0, 3000, 120, 1.0, log=True, worsens=-0.6, kind="other"),
    "Weight": Physiology(20, 300, 82, 20, decimals=1),
    "MechVent": Physiology(0, 1, 1, 0, kind="other"),
}
# Static descriptors: plausible ranges (values outside -> missing, e.g. a height of 13 cm).
STATIC_RANGES = {"Age": (0, 120), "Height": (100, 250), "Weight": (20, 300), "Gender": (0, 1)}


def static_width(name: str) -> int:
    """Columns a static descriptor takes in the ``static`` tensor."""
    return len(ICU_TYPES) if name == "ICUType" else 2  # value + missing flag


# --------------------------------------------------------------------------- config


def variable_names(task_cfg: Mapping[str, Any]) -> list[str]:
    variables = [str(v) for v in task_cfg.get("variables") or []]
    if not variables or len(set(variables)) != len(variables):
        raise DataError(f"task.variables must be a non-empty list of distinct names, "
                        f"got {variables}")
    return variables


def _statics(task_cfg: Mapping[str, Any]) -> list[str]:
    statics = [str(v) for v in task_cfg.get("static") or []]
    if "RecordID" in statics:
        raise DataError("task.static must not contain RecordID (an identifier, not a feature)")
    return statics


def _check_spec(task_cfg: Mapping[str, Any]) -> None:
    spec = task_cfg["spec"]
    variables, statics = variable_names(task_cfg), _statics(task_cfg)
    width = sum(static_width(s) for s in statics)
    if int(spec["num_variables"]) != len(variables):
        raise DataError(f"task.spec.num_variables={spec['num_variables']} but task.variables "
                        f"lists {len(variables)} variables; they must agree")
    if int(spec["num_static"]) != width:
        raise DataError(f"task.spec.num_static={spec['num_static']} but task.static "
                        f"{statics} encodes to {width} columns (2 per descriptor, "
                        f"{len(ICU_TYPES)} for ICUType); they must agree")
    if int(spec["num_classes"]) < 2:
        raise DataError("task.spec.num_classes must be >= 2")


def is_test_stay(stay_id: str, test_fraction: float) -> bool:
    """Deterministic split from a stable hash of the stay id (never Python's ``hash()``)."""
    digest = hashlib.sha256(f"medsilo-vitals-split:{stay_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


# --------------------------------------------------------------------------- reading


@dataclass
class Stay:
    """One ICU stay as read from the files: time-series observations and static descriptors."""

    stay_id: str
    hours: list[float] = field(default_factory=list)  # time since admission, hours
    variable: list[int] = field(default_factory=list)  # index into task.variables
    value: list[float] = field(default_factory=list)
    static: dict[str, float] = field(default_factory=dict)


class Observations:
    """Filters observations into a stay and counts what it leaves out, by reason."""

    def __init__(self, task_cfg: Mapping[str, Any], counts: Counter) -> None:
        self.index = {v: i for i, v in enumerate(variable_names(task_cfg))}
        self.statics = set(_statics(task_cfg))
        self.hours = float(task_cfg.get("hours", 48))
        self.counts = counts

    def add(self, stay: Stay, time_h: float, name: str, value: float) -> None:
        column = self.index.get(name)
        if column is None:
            self.counts["unused_variable_observations"] += 1
            return
        if not 0 <= time_h < self.hours:
            return  # outside the prediction window: not part of the example, nothing lost
        if value == MISSING or math.isnan(value):
            self.counts["missing_value_observations"] += 1
            return
        limits = PHYSIOLOGY.get(name)
        # an infinite value (inf, 1e400) is an entry error for every variable, known or not
        if not math.isfinite(value) or (limits is not None
                                        and not limits.low <= value <= limits.high):
            self.counts["implausible_value_observations"] += 1
            return
        stay.hours.append(time_h)
        stay.variable.append(column)
        stay.value.append(value)

    def add_static(self, stay: Stay, name: str, value: float) -> None:
        if name not in self.statics or name in stay.static:
            return
        if value == MISSING or math.isnan(value):
            return  # recorded as missing (its flag says so)
        low, high = STATIC_RANGES.get(name, (-math.inf, math.inf))
        # ICUType is a code: anything but the four challenge units is an entry error
        if (not math.isfinite(value) or not low <= value <= high
                or (name == "ICUType" and value not in ICU_TYPES)):
            self.counts["implausible_static_values"] += 1
            return
        stay.static[name] = value


def _parse_time(text: str) -> float | None:
    hours, sep, minutes = text.strip().partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        return None
    if int(minutes) >= 60:
        return None
    return int(hours) + int(minutes) / 60.0


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _parse_value(text: str) -> float | None:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "na"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def read_physionet_record(path: Path, observations: Observations) -> Stay:
    """One ``<RecordID>.txt``: descriptors at the top at 00:00, then time-stamped measurements."""
    lines = read_text_file(path, "a PhysioNet 2012 record (Time,Parameter,Value)").splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != RECORD_HEADER:
        first = lines[0] if lines else "(empty file)"
        raise DataError(f"{path}:1: expected the header 'Time,Parameter,Value', got {first!r}")
    stay = Stay(stay_id=path.stem)
    in_descriptors = True  # the descriptor block ends at the first measurement
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        time_h = _parse_time(parts[0]) if len(parts) == 3 else None
        value = _parse_value(parts[2]) if len(parts) == 3 else None
        if time_h is None or value is None:
            raise DataError(f"{path}:{lineno}: expected 'HH:MM,Parameter,Value' with a numeric "
                            f"value, got {line!r}")
        name = parts[1].strip()
        if in_descriptors and time_h == 0 and name in DESCRIPTORS and name not in stay.static:
            if name == "RecordID":
                if value != MISSING and number_text(value) != path.stem:
                    raise DataError(f"{path}:{lineno}: RecordID {number_text(value)} does not "
                                    f"match the file name (expected {path.stem})")
                stay.static[name] = value
            else:
                observations.add_static(stay, name, value)
                stay.static.setdefault(name, MISSING)  # seen (possibly missing)
            continue
        in_descriptors = False
        observations.add(stay, time_h, name, value)
    stay.static = {k: v for k, v in stay.static.items() if v != MISSING and k != "RecordID"}
    return stay


def _csv_records(
    path: Path, required: tuple[str, ...], hint: str = ""
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and ``(line number, fields)`` of every non-blank row of a CSV file.

    A header without the ``required`` columns, or a row with the wrong number of fields,
    raises :class:`DataError` naming the file and line.
    """
    lines = text_lines(path, f"a CSV file with columns {','.join(required)}")
    reader = csv.reader(lines)
    header = [h.strip() for h in _next_row(reader, path, [])]
    missing = [c for c in required if c not in header]
    if missing:
        lines.close()
        raise DataError(f"{path}:1: header {header} lacks {missing}; expected columns "
                        f"{','.join(required)}" + (f" ({hint})" if hint else ""))

    def rows() -> Iterator[tuple[int, list[str]]]:
        with closing(lines):
            while (row := _next_row(reader, path, None)) is not None:
                if not row or not "".join(row).strip():
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields "
                                    f"({','.join(header)}), got {len(row)}: {','.join(row)!r}")
                yield reader.line_num, row

    return header, rows()


def _next_row(reader: Any, path: Path, default: list[str] | None) -> list[str] | None:
    try:
        return next(reader, default)
    except csv.Error as err:  # e.g. a quoted field cut off by a truncated copy
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err


@dataclass
class LabelRow:
    stay_id: str
    label: int
    lineno: int
    fields: dict[str, str]


def read_labels(path: Path, id_column: str, label_column: str,
                num_classes: int) -> dict[str, LabelRow]:
    """An outcomes / labels CSV: stay id -> label (file order kept); every row checked."""
    rows: dict[str, LabelRow] = {}
    header, records = _csv_records(path, (id_column, label_column), "task.label_column")
    id_at, label_at = header.index(id_column), header.index(label_column)
    for lineno, row in records:
        stay_id, label = row[id_at].strip(), row[label_at].strip()
        if not label.lstrip("-").isdigit() or not 0 <= int(label) < num_classes:
            raise DataError(f"{path}:{lineno}: {label_column}={label!r} for stay {stay_id}; "
                            f"expected an integer 0..{num_classes - 1}")
        if stay_id in rows:
            raise DataError(f"{path}:{lineno}: stay {stay_id} is listed twice (first on "
                            f"line {rows[stay_id].lineno})")
        rows[stay_id] = LabelRow(stay_id, int(label), lineno,
                                 dict(zip(header, (f.strip() for f in row), strict=True)))
    return rows


def read_long_csv(path: Path, observations: Observations) -> dict[str, Stay]:
    """``stay_id,time_hours,variable,value`` rows (any order) -> stays."""
    stays: dict[str, Stay] = {}
    header, records = _csv_records(path, EVENT_COLUMNS)
    at = [header.index(c) for c in EVENT_COLUMNS]
    for lineno, row in records:
        stay_id, time_text, name, value_text = (row[i].strip() for i in at)
        time_h, value = _parse_value(time_text), _parse_value(value_text)
        if not stay_id or time_h is None or not math.isfinite(time_h) or value is None:
            raise DataError(f"{path}:{lineno}: expected stay_id, numeric time_hours and a "
                            f"numeric (or empty) value, got {','.join(row)!r}")
        stay = stays.get(stay_id)
        if stay is None:
            stay = stays[stay_id] = Stay(stay_id)
        if name in observations.statics:
            observations.add_static(stay, name, value)
        else:
            observations.add(stay, time_h, name, value)
    return stays


def site_format(folder: Path, task_cfg: Mapping[str, Any]) -> str:
    fmt = str(task_cfg.get("format", "auto"))
    if fmt not in FORMATS:
        raise DataError(f"task.format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist or is not a directory")
    records = folder / file_name(task_cfg, "records_dir")
    if fmt != "long_csv" and records.exists() and not records.is_dir():
        raise DataError(f"{records}: a file; expected a folder of <RecordID>.txt files "
                        "(PhysioNet 2012 layout, task.records_dir)")
    if fmt != "auto":
        return fmt
    if records.is_dir():
        return "physionet"
    if (folder / file_name(task_cfg, "events_file")).is_file():
        return "long_csv"
    raise DataError(
        f"{folder}: found neither {file_name(task_cfg, 'records_dir')}/ + "
        f"{file_name(task_cfg, 'outcomes_file')} (PhysioNet 2012 layout) nor "
        f"{file_name(task_cfg, 'events_file')} + {file_name(task_cfg, 'labels_file')} (long CSV)"
    )


_DEFAULT_NAMES = {"records_dir": "set-a", "outcomes_file": "Outcomes-a.txt",
                  "events_file": "events.csv", "labels_file": "labels.csv"}


def file_name(task_cfg: Mapping[str, Any], key: str) -> str:
    return str(task_cfg.get(key) or _DEFAULT_NAMES[key])


@dataclass
class _Site:
    stays: list[Stay]
    labels: list[int]
    source: str
    skipped: Counter


def read_site(folder: Path, task_cfg: Mapping[str, Any]) -> _Site:
    """All usable labelled stays of one folder, with counts of what was left out."""
    folder = Path(folder)
    fmt = site_format(folder, task_cfg)
    counts: Counter = Counter()
    observations = Observations(task_cfg, counts)
    num_classes = int(task_cfg["spec"]["num_classes"])
    if fmt == "physionet":
        records = folder / file_name(task_cfg, "records_dir")
        outcomes = folder / file_name(task_cfg, "outcomes_file")
        if not records.is_dir():
            raise DataError(f"{records}: missing; expected a folder of <RecordID>.txt files "
                            "(PhysioNet 2012 layout)")
        label_rows = read_labels(outcomes, "RecordID",
                                 str(task_cfg.get("label_column", "In-hospital_death")),
                                 num_classes)
        files = {p.stem: p for p in records.glob("*.txt")}
        counts["record_without_outcome"] += sum(1 for s in files if s not in label_rows)
        stays = {}
        for stay_id in label_rows:
            if stay_id not in files:
                counts["stay_without_record"] += 1
                continue
            stays[stay_id] = read_physionet_record(files[stay_id], observations)
        source = str(folder)
    else:
        events = folder / file_name(task_cfg, "events_file")
        label_rows = read_labels(folder / file_name(task_cfg, "labels_file"), "stay_id",
                                 "label", num_classes)
        stays = read_long_csv(events, observations)
        counts["record_without_outcome"] += sum(1 for s in stays if s not in label_rows)
        counts["stay_without_record"] += sum(1 for s in label_rows if s not in stays)
        stays = {s: stays[s] for s in label_rows if s in stays}
        source = str(events)
    kept, labels = [], []
    for stay_id, stay in stays.items():
        if not stay.value:
            counts["no_observations"] += 1  # nothing measured in the window: no example
            continue
        kept.append(stay)
        labels.append(label_rows[stay_id].label)
    return _Site(kept, labels, source, Counter({k: v for k, v in counts.items() if v}))


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class Standardiser:
    """Per-variable (on the log1p scale for ``log`` variables) and per-descriptor mean/sd:
    fitted on one site's training stays (:func:`fit_standardiser`) or fixed reference values
    (:func:`reference_standardiser`)."""

    mean: np.ndarray
    sd: np.ndarray
    static_mean: dict[str, float]
    static_sd: dict[str, float]


def _log_flags(variables: Sequence[str]) -> np.ndarray:
    return np.array([PHYSIOLOGY[v].log if v in PHYSIOLOGY else False for v in variables])


def _transformed(stay: Stay, log_flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    columns = np.asarray(stay.variable, dtype=np.int64)
    values = np.asarray(stay.value, dtype=np.float64)
    logged = log_flags[columns]
    values[logged] = np.log1p(np.maximum(values[logged], 0.0))
    return columns, values


def fit_standardiser(stays: Sequence[Stay], variables: Sequence[str],
                     statics: Sequence[str]) -> Standardiser:
    log_flags = _log_flags(variables)
    total = np.zeros(len(variables))
    square = np.zeros(len(variables))
    count = np.zeros(len(variables))
    for stay in stays:
        columns, values = _transformed(stay, log_flags)
        np.add.at(total, columns, values)
        np.add.at(square, columns, values**2)
        np.add.at(count, columns, 1)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    var = np.divide(square, count, out=np.ones_like(total), where=count > 1) - mean**2
    sd = np.where(count > 1, np.sqrt(np.maximum(var, 0.0)), 1.0)
    static_mean, static_sd = {}, {}
    for name in statics:
        if name in ("ICUType", "Gender"):
            continue
        seen = np.array([s.static[name] for s in stays if name in s.static], dtype=np.float64)
        static_mean[name] = float(seen.mean()) if len(seen) else 0.0
        static_sd[name] = float(seen.std()) if len(seen) > 1 else 1.0
    return Standardiser(mean, np.maximum(sd, 1e-6), static_mean,
                        {k: max(v, 1e-6) for k, v in static_sd.items()})


def reference_standardiser(task_cfg: Mapping[str, Any]) -> Standardiser:
    """``task.reference``'s [mean, sd] per variable and scaled descriptor (Age, Height, Weight):
    no stay's value enters them."""
    variables = variable_names(task_cfg)
    scaled = [s for s in _statics(task_cfg) if s not in ("ICUType", "Gender")]
    reference = reference_stats(task_cfg, [*variables, *scaled])
    return Standardiser(np.array([reference[v][0] for v in variables]),
                        np.array([reference[v][1] for v in variables]),
                        {s: reference[s][0] for s in scaled}, {s: reference[s][1] for s in scaled})


def standardiser_for(train_stays: Sequence[Stay], task_cfg: Mapping[str, Any]) -> Standardiser:
    """The ``task.standardize`` choice: reference values, or this site's training stays."""
    if standardize_mode(task_cfg) == "reference":
        return reference_standardiser(task_cfg)
    return fit_standardiser(train_stays, variable_names(task_cfg), _statics(task_cfg))


def stays_to_tensors(stays: Sequence[Stay], labels: Sequence[int], task_cfg: Mapping[str, Any],
                     scale: Standardiser) -> TensorDataset:
    """``series`` (N, hours, 3V) = [value carried forward | observed mask | hours since last
    observation / hours], ``static`` (N, S), ``label`` (N,)."""
    variables, statics = variable_names(task_cfg), _statics(task_cfg)
    hours, n_vars, n = int(task_cfg.get("hours", 48)), len(variables), len(stays)
    log_flags = _log_flags(variables)
    sums = np.zeros((n, hours, n_vars))
    counts = np.zeros((n, hours, n_vars))
    for i, stay in enumerate(stays):
        columns, values = _transformed(stay, log_flags)
        bins = np.minimum(np.asarray(stay.hours, dtype=np.float64).astype(np.int64), hours - 1)
        z = (values - scale.mean[columns]) / scale.sd[columns]
        np.add.at(sums[i], (bins, columns), np.clip(z, -6.0, 6.0))
        np.add.at(counts[i], (bins, columns), 1)
    observed = counts > 0
    hourly = np.divide(sums, counts, out=np.zeros_like(sums), where=observed)
    # Carry the last observation forward (0 = the standardiser's mean before the first one);
    # delta counts hours since the last observation (GRU-D, Che et al. 2018).
    values = np.zeros_like(hourly)
    delta = np.zeros_like(hourly)
    last = np.zeros((n, n_vars))
    since = np.zeros((n, n_vars))
    for t in range(hours):
        last = np.where(observed[:, t], hourly[:, t], last)
        since = np.where(observed[:, t], 0.0, since + 1.0)
        values[:, t], delta[:, t] = last, since
    series = np.concatenate([values, observed.astype(np.float64), delta / hours], axis=2)
    static = np.zeros((n, sum(static_width(s) for s in statics)))
    for i, stay in enumerate(stays):
        col = 0
        for name in statics:
            value = stay.static.get(name)
            if name == "ICUType":
                if value is not None and int(value) in ICU_TYPES:
                    static[i, col + ICU_TYPES.index(int(value))] = 1.0
            elif value is None:
                static[i, col + 1] = 1.0  # missing flag; value stays at the mean (0)
            elif name == "Gender":
                static[i, col] = 1.0 if value == 1 else -1.0
            else:
                static[i, col] = (value - scale.static_mean[name]) / scale.static_sd[name]
            col += static_width(name)
    return TensorDataset(
        torch.from_numpy(series.astype(np.float32)),
        torch.from_numpy(np.clip(static, -6, 6).astype(np.float32)),
        torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
    )


# --------------------------------------------------------------------------- the task


@register_task
class VitalsTask(Task):
    name = "vitals"

    @staticmethod
    def input_spec(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
        _check_spec(task_cfg)
        return dict(task_cfg["spec"])

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        _check_spec(task_cfg)
        site = read_site(Path(folder), task_cfg)
        fraction = float(task_cfg.get("test_fraction", 0.25))
        in_test = np.array([is_test_stay(s.stay_id, fraction) for s in site.stays], dtype=bool)
        train_stays = [s for s, t in zip(site.stays, in_test, strict=True) if not t]
        test_stays = [s for s, t in zip(site.stays, in_test, strict=True) if t]
        labels = np.asarray(site.labels, dtype=np.int64)
        if not train_stays:
            raise DataError(f"site {site_id}: {site.source} has zero training stays "
                            f"(usable stays: {len(site.stays)}, left out: {dict(site.skipped)})")
        # Site statistics never leave the site, but under DP they must not be used at all: each
        # stay would move every other stay's values (task.standardize=reference).
        scale = standardiser_for(train_stays, task_cfg)
        return SiteData(
            site_id=site_id,
            train=stays_to_tensors(train_stays, labels[~in_test], task_cfg, scale),
            test=stays_to_tensors(test_stays, labels[in_test], task_cfg, scale),
            num_classes=int(task_cfg["spec"]["num_classes"]),
            source=site.source,
            skipped=dict(site.skipped),
        )
