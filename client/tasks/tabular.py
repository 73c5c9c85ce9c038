"""Tabular: classification from patient records, one CSV table per site.

The default layout is the UCI Heart Disease ``processed.<centre>.data`` files (the basis of
FLamby's Fed-Heart-Disease: cleveland, hungarian, switzerland, va): no header line, ``?`` for
a missing value, 13 features and ``num`` (0 = no disease, 1-4 = disease), binarised ``num > 0``.
Any CSV works by configuration (``conf/task/tabular.yaml``):

- ``header``: ``first_line`` (the first line names the columns) or ``none`` (names from
  ``columns``); ``delimiter``; ``missing_values`` (tokens meaning "not recorded", e.g. ``?``,
  empty, ``NaN``); ``zero_as_missing`` (columns where 0 means "not measured", like
  switzerland's cholesterol).
- ``numeric``: columns read as numbers. Each becomes two features: the standardised value (a
  missing value is imputed with the mean, i.e. 0 after standardising) and a missing indicator.
  ``standardize`` says whose mean/std: ``reference`` (``task.reference``: published UCI
  Cleveland summary statistics, outside every site's data, so a patient's features depend on
  that patient alone; what DP-SGD needs) or ``site`` (the site's own training split); ``auto``
  is reference under privacy=dp, site otherwise (resolved with the run settings).
- ``categorical``: column -> its fixed list of codes. Each becomes a one-hot block over the
  declared codes plus a missing indicator. Codes come from config, never from data, so every
  site encodes identically. A value that is not a declared code is a :class:`DataError`
  naming file, line and column (it is not mapped to an "unknown" slot: a typo or a different
  coding at one hospital would otherwise silently become noise). Blocks are laid out in sorted
  column-name order, because mappings lose their order on the way to sites.
- the label: ``label`` column; either ``label_threshold`` (class 1 if value > threshold) or
  ``label_classes`` (class index = position of the value in the list). A missing label or a
  value outside the declared classes is a :class:`DataError` naming file and line.

Site folder: ``train.csv`` + ``test.csv`` if both exist, else the one file matching ``file``
(a glob), split deterministically: a row goes to test when the CRC32 of its content falls
below ``test_fraction`` (stable under reordering or appending rows; identical rows share a
split). Other columns (an id, a site name) are ignored. A row with no recorded feature at all
is skipped and counted (``skipped["all_features_missing"]``). Synthetic sites in this layout
are written by ``simulations/synthetic/tabular.py``.

The encoded width (``spec.num_features``) follows from config alone (:func:`encoded_width`), so
the server can build the model without seeing any site's data.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.tasks.base import (
    DataError,
    SiteData,
    Task,
    reference_stats,
    standardize_mode,
    text_lines,
)
from client.tasks.registry import register_task

SPLIT_FILES = ("train.csv", "test.csv")
HEADER_MODES = ("first_line", "none")
ALL_MISSING = "all_features_missing"


# --------------------------------------------------------------------------- config


def _categorical(task_cfg: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """(column, declared codes) in sorted column order (the wire sorts mapping keys anyway)."""
    declared = task_cfg.get("categorical") or {}
    return [(str(name), list(declared[name])) for name in sorted(declared)]


def _numeric(task_cfg: Mapping[str, Any]) -> list[str]:
    return [str(c) for c in task_cfg.get("numeric") or []]


def encoded_width(task_cfg: Mapping[str, Any]) -> int:
    """Width of the feature vector, from config alone: 2 per numeric column (value, missing
    indicator), codes + 1 per categorical column (one-hot, missing indicator)."""
    return 2 * len(_numeric(task_cfg)) + sum(len(codes) + 1 for _, codes in _categorical(task_cfg))


def feature_names(task_cfg: Mapping[str, Any]) -> list[str]:
    """Names of the encoded features, in model-input order (for reports and debugging)."""
    names = []
    for col in _numeric(task_cfg):
        names += [col, f"{col}_missing"]
    for col, codes in _categorical(task_cfg):
        names += [f"{col}={code}" for code in codes] + [f"{col}_missing"]
    return names


def _num_classes(task_cfg: Mapping[str, Any]) -> int:
    return int(task_cfg["spec"]["num_classes"])


def _check_config(task_cfg: Mapping[str, Any]) -> None:
    where = "conf/task (task.*)"
    header = str(task_cfg.get("header", "first_line"))
    if header not in HEADER_MODES:
        raise DataError(f"{where}: task.header must be one of {list(HEADER_MODES)}, got {header!r}")
    if header == "none" and not task_cfg.get("columns"):
        raise DataError(f"{where}: task.header=none needs task.columns (the column names in "
                        "file order)")
    numeric, categorical = _numeric(task_cfg), [c for c, _ in _categorical(task_cfg)]
    if not numeric and not categorical:
        raise DataError(f"{where}: declare at least one feature in task.numeric or "
                        "task.categorical")
    both = sorted(set(numeric) & set(categorical))
    if both:
        raise DataError(f"{where}: columns {both} are declared both numeric and categorical")
    label = task_cfg.get("label")
    if not label:
        raise DataError(f"{where}: task.label (the label column) is not set")
    if label in numeric or label in categorical:
        raise DataError(f"{where}: the label column {label!r} is also declared as a feature")
    for col, codes in _categorical(task_cfg):
        if not codes:
            raise DataError(f"{where}: task.categorical.{col} declares no codes")
        normalised = [_normalise(c) for c in codes]
        if len(set(normalised)) != len(normalised):
            raise DataError(f"{where}: task.categorical.{col} declares a code twice: {codes}")
    threshold, classes = task_cfg.get("label_threshold"), task_cfg.get("label_classes")
    if (threshold is None) == (classes is None):
        raise DataError(f"{where}: set exactly one of task.label_threshold (binarise: class 1 "
                        "if value > threshold) or task.label_classes (the label values)")
    expected = 2 if threshold is not None else len(classes)
    if _num_classes(task_cfg) != expected:
        raise DataError(f"{where}: task.spec.num_classes={_num_classes(task_cfg)} but the label "
                        f"rule gives {expected} classes")
    fraction = float(task_cfg.get("test_fraction", 0.25))
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"{where}: task.test_fraction must be in [0, 1), got {fraction}")


# --------------------------------------------------------------------------- reading


@dataclass
class Table:
    """The rows of one CSV file, as text (nothing interpreted yet)."""

    path: Path
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]  # 1-based line number of each row, for error messages


def _normalise(value: Any) -> Any:
    """Codes compare as numbers when they are numbers ("6.0" == 6), else as stripped text."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def read_table(path: Path, task_cfg: Mapping[str, Any]) -> Table:
    """Parse one CSV file; a wrong number of fields is a DataError naming file and line."""
    header = str(task_cfg.get("header", "first_line"))
    delimiter = str(task_cfg.get("delimiter", ","))
    expected = "a CSV table" + (" (task.header=none: records only, columns from task.columns)"
                                if header == "none" else " with a header line")
    # not UTF-8, NUL bytes, a directory: text_lines names the file (and line)
    reader = csv.reader(text_lines(path, expected), delimiter=delimiter)
    rows, lines = [], []
    columns: list[str] | None = None
    if header == "none":
        columns = [str(c) for c in task_cfg["columns"]]
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields) and len(fields) <= 1:
                continue  # a blank line is not a record
            fields = [f.strip() for f in fields]
            if columns is None:
                columns = fields
                continue
            if len(fields) != len(columns):
                raise DataError(
                    f"{path}, line {line}: {len(fields)} fields, expected {len(columns)} "
                    f"({', '.join(columns)})" + (" as declared in task.columns"
                                                 if header == "none" else " as in the header")
                )
            rows.append(fields)
            lines.append(line)
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not a readable CSV file ({err})"
                        ) from err
    if columns is None:
        raise DataError(f"{path}: empty file; expected a header line naming the columns "
                        "(or task.header=none with task.columns)")
    if header == "none" and not rows:
        raise DataError(f"{path}: empty file; expected {expected}")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataError(f"{path}: column names {duplicated} appear more than once")
    needed = [str(task_cfg["label"]), *_numeric(task_cfg), *(c for c, _ in _categorical(task_cfg))]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{path}: columns {missing} are missing; found {columns}")
    return Table(path=path, columns=columns, rows=rows, lines=lines)


@dataclass
class Parsed:
    """Rows interpreted: raw numbers (NaN = missing), category indices (-1 = missing), labels."""

    numeric: np.ndarray  # (n, num_numeric) float64
    categorical: np.ndarray  # (n, num_categorical) int64
    labels: np.ndarray  # (n,) int64


def _header_hint(table: Table, row: int, task_cfg: Mapping[str, Any]) -> str:
    """Under task.header=none, a first record with no number in it is most likely the file's
    header line: say so, with the fix, instead of only "'age' is not a number"."""
    if row != 0 or str(task_cfg.get("header", "first_line")) != "none":
        return ""
    fields = table.rows[0]
    if any(_is_number(f) for f in fields):
        return ""
    shown = ", ".join(fields[:4]) + (", ..." if len(fields) > 4 else "")
    return (f"; line {table.lines[0]} looks like a header ({shown}): if the file names its "
            "columns on its first line, set task.header=first_line")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _BadValue(Exception):
    """A value :func:`parse_rows` refuses: the message after "<file>, line <n>", and whether
    the header hint (:func:`_header_hint`) may apply."""

    def __init__(self, message: str, hint: bool = True) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


class _Rules:
    """How one value of each kind of column is read (the task's missing tokens, zeros that mean
    "not measured", declared codes and classes); raises :class:`_BadValue`."""

    def __init__(self, task_cfg: Mapping[str, Any]) -> None:
        self.missing = {str(t) for t in task_cfg.get("missing_values", ["?", "", "NaN"])}
        self.zero_missing = {str(c) for c in task_cfg.get("zero_as_missing") or []}
        self.label_col = str(task_cfg["label"])
        self.threshold = task_cfg.get("label_threshold")
        self.classes = task_cfg.get("label_classes")
        self.class_of = (None if self.classes is None
                         else {_normalise(v): i for i, v in enumerate(self.classes)})

    def numeric(self, col: str, text: str) -> float:
        if text in self.missing:
            return math.nan
        try:
            value = float(text)
        except ValueError:
            raise _BadValue(f", column {col!r}: {text!r} is not a number (missing values are "
                            f"written as one of {sorted(self.missing)})") from None
        if math.isnan(value) or (value == 0 and col in self.zero_missing):
            return math.nan
        if not math.isfinite(value):
            raise _BadValue(f", column {col!r}: {text!r} is not a finite number", hint=False)
        return value

    def categorical(self, col: str, codes: Sequence[Any], code_of: Mapping[Any, int],
                    text: str) -> int:
        if text in self.missing:
            return -1
        k = code_of.get(_normalise(text))
        if k is None:
            raise _BadValue(f", column {col!r}: {text!r} is not one of the declared codes "
                            f"{codes} (task.categorical.{col})")
        return k

    def label(self, text: str) -> int:
        col = self.label_col
        if text in self.missing:
            raise _BadValue(f": the label {col!r} is missing; every record needs one", hint=False)
        if self.threshold is not None:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise _BadValue(f": label {col!r} = {text!r} is not a number "
                                f"(task.label_threshold={self.threshold} binarises a numeric "
                                "label)")
            return int(value > float(self.threshold))
        assert self.class_of is not None
        k = self.class_of.get(_normalise(text))
        if k is None:
            raise _BadValue(f": label {col!r} = {text!r} is outside the declared classes "
                            f"{list(self.classes)} (task.label_classes)")
        return k


def parse_rows(table: Table, task_cfg: Mapping[str, Any]) -> Parsed:
    """The table's values, read a column at a time with each distinct text of a column read
    once (a site's few hundred rows hold few distinct values per column). A value it refuses
    is a DataError naming the file, line and column of the first one in file order (within a
    row: numeric columns, categorical columns, then the label)."""
    rules = _Rules(task_cfg)
    index = {c: i for i, c in enumerate(table.columns)}
    n = len(table.rows)
    columns = list(zip(*table.rows)) if n else [()] * len(table.columns)
    numeric_cols = _numeric(task_cfg)
    width = len(numeric_cols)  # readers [0, width) are numeric, then categorical, then label
    readers: list[tuple[str, Callable[[str], Any]]] = [
        (col, functools.partial(rules.numeric, col)) for col in numeric_cols]
    readers += [(col, functools.partial(rules.categorical, col, codes,
                                        {_normalise(code): k for k, code in enumerate(codes)}))
                for col, codes in _categorical(task_cfg)]
    readers.append((rules.label_col, rules.label))
    values: list[np.ndarray] = []
    first_bad: tuple[int, int, _BadValue] | None = None  # (row, reader, error)
    for j, (col, read) in enumerate(readers):
        texts = columns[index[col]]
        table_of: dict[str, Any] = {}
        bad: dict[str, _BadValue] = {}
        for text in set(texts):
            try:
                table_of[text] = read(text)
            except _BadValue as err:
                bad[text] = err
        if bad:
            row = next(r for r, text in enumerate(texts) if text in bad)
            if first_bad is None or row < first_bad[0]:
                first_bad = (row, j, bad[texts[row]])
            continue
        dtype = float if j < width else np.int64
        values.append(np.fromiter(map(table_of.__getitem__, texts), dtype, n))
    if first_bad is not None:
        row, _, err = first_bad
        raise DataError(f"{table.path}, line {table.lines[row]}{err.message}"
                        + (_header_hint(table, row, task_cfg) if err.hint else ""))
    numeric = np.stack(values[:width], axis=1) if width else np.empty((n, 0))
    cats = (np.stack(values[width:-1], axis=1) if len(values) - 1 > width
            else np.empty((n, 0), dtype=np.int64))
    return Parsed(numeric=numeric, categorical=cats, labels=values[-1])


def numeric_scale(parsed: Parsed, task_cfg: Mapping[str, Any], train_rows: np.ndarray,
                  ) -> list[tuple[float, float]]:
    """(mean, sd) per numeric column: ``task.reference``'s published values under
    ``standardize: reference`` (no patient's value enters them), else the site's own training
    split (``train_rows``; every training patient moves every other one's features)."""
    numeric = _numeric(task_cfg)
    if standardize_mode(task_cfg) == "reference":
        reference = reference_stats(task_cfg, numeric)
        return [reference[col] for col in numeric]
    scale = []
    train_values = parsed.numeric[train_rows]
    for j in range(len(numeric)):
        observed = train_values[:, j][~np.isnan(train_values[:, j])]
        mean = float(observed.mean()) if len(observed) else 0.0
        std = float(observed.std()) if len(observed) > 1 else 0.0
        scale.append((mean, std if std > 1e-8 else 1.0))
    return scale


def encode_features(parsed: Parsed, task_cfg: Mapping[str, Any], train_rows: np.ndarray,
                    ) -> np.ndarray:
    """Encoded float32 matrix, standardised by :func:`numeric_scale` (``site``: statistics of
    ``train_rows`` only, this site's training split; nothing about another site is needed)."""
    blocks = []
    for j, (mean, std) in enumerate(numeric_scale(parsed, task_cfg, train_rows)):
        values = parsed.numeric[:, j]
        is_missing = np.isnan(values)
        # mean imputation (the reference or site mean): a missing value sits at 0 after
        # standardising, flagged by the indicator
        blocks += [np.where(is_missing, 0.0, (values - mean) / std)[:, None],
                   is_missing[:, None].astype(np.float64)]
    for j, (_, codes) in enumerate(_categorical(task_cfg)):
        onehot = np.zeros((len(parsed.labels), len(codes) + 1))
        slot = np.where(parsed.categorical[:, j] < 0, len(codes), parsed.categorical[:, j])
        onehot[np.arange(len(slot)), slot] = 1.0
        blocks.append(onehot)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _row_is_test(fields: Sequence[str], fraction: float) -> bool:
    """Deterministic, data-order-independent split: the row's content decides."""
    return zlib.crc32("\x1f".join(fields).encode()) / 2**32 < fraction


def site_files(folder: Path, task_cfg: Mapping[str, Any]) -> list[Path]:
    """``[train.csv, test.csv]`` or ``[the one file matching task.file]``."""
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist or is not a directory")
    split = [folder / name for name in SPLIT_FILES]
    if all(p.is_file() for p in split):
        return split
    pattern = str(task_cfg.get("file", "*.csv"))
    matches = sorted(p for p in folder.iterdir() if p.is_file()
                     and fnmatch.fnmatch(p.name, pattern) and p.name not in SPLIT_FILES)
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(p.name for p in matches)
        folders = sorted(p.name for p in folder.iterdir() if p.is_dir()
                         and fnmatch.fnmatch(p.name, pattern))
        if folders:
            found += f" (directories {folders} match the pattern but are not files)"
        raise DataError(f"{folder}: expected train.csv + test.csv, or exactly one file matching "
                        f"{pattern!r} (task.file); found {found}")
    return matches


def parse_site(folder: Path, task_cfg: Mapping[str, Any]
                ) -> tuple[Parsed, np.ndarray, str, Table]:
    files = site_files(Path(folder), task_cfg)
    tables = [read_table(p, task_cfg) for p in files]
    parsed = [parse_rows(t, task_cfg) for t in tables]  # each names its own file on error
    if len(tables) == 2:
        train, test = tables
        if train.columns != test.columns:
            raise DataError(f"{test.path}: columns {test.columns} differ from {train.path}'s "
                            f"{train.columns}")
        merged = Parsed(*(np.concatenate([getattr(p, k) for p in parsed])
                          for k in ("numeric", "categorical", "labels")))
        is_test = np.r_[np.zeros(len(train.rows), bool), np.ones(len(test.rows), bool)]
        table = Table(train.path, train.columns, train.rows + test.rows, train.lines + test.lines)
        return merged, is_test, f"{train.path} + {test.path.name}", table
    fraction = float(task_cfg.get("test_fraction", 0.25))
    is_test = np.array([_row_is_test(f, fraction) for f in tables[0].rows], dtype=bool)
    return parsed[0], is_test, str(tables[0].path), tables[0]


# --------------------------------------------------------------------------- the task


@register_task
class TabularTask(Task):
    name = "tabular"

    @staticmethod
    def input_spec(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``spec`` with ``num_features`` computed from the declared columns; a stale value in
        config (columns changed, ``spec.num_features`` not) is an error, not a silent mismatch."""
        _check_config(task_cfg)
        spec = dict(task_cfg["spec"])
        width = encoded_width(task_cfg)
        declared = spec.get("num_features")
        if declared is not None and int(declared) != width:
            raise DataError(f"task.spec.num_features={declared} but the declared columns encode "
                            f"to {width} features (2 per numeric column, codes + 1 per "
                            f"categorical column); set task.spec.num_features={width}")
        spec["num_features"] = width
        return spec

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        self.input_spec(task_cfg)
        parsed, is_test, source, _ = parse_site(Path(folder), task_cfg)
        usable = ~(np.isnan(parsed.numeric).all(axis=1) & (parsed.categorical < 0).all(axis=1))
        skipped = {ALL_MISSING: int((~usable).sum())} if (~usable).any() else {}
        train_rows = np.flatnonzero(usable & ~is_test)
        test_rows = np.flatnonzero(usable & is_test)
        if len(train_rows) == 0:
            raise DataError(f"site {site_id}: {source} has zero training records"
                            + (f" ({skipped[ALL_MISSING]} had no recorded feature)"
                               if skipped else ""))
        features = encode_features(parsed, task_cfg, train_rows)
        # rows picked in numpy: a torch tensor indexed by a numpy array copies element by
        # element (5 ms a split at 300 rows, most of a site's loading time)
        return SiteData(
            site_id=site_id,
            train=TensorDataset(torch.from_numpy(features[train_rows]),
                                torch.from_numpy(parsed.labels[train_rows])),
            test=TensorDataset(torch.from_numpy(features[test_rows]),
                               torch.from_numpy(parsed.labels[test_rows])),
            num_classes=_num_classes(task_cfg),
            source=source,
            skipped=skipped,
        )
