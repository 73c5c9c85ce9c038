"""Notes: classification of clinical notes (e.g. does the discharge note indicate pneumonia?).

One file of notes per site folder (``task.file``, default ``notes.csv``), in either format
(``task.format``: ``csv``, ``jsonl`` or ``auto`` = by the file suffix):

- CSV with a header row (RFC 4180 quoting: notes may hold commas, quotes and newlines), any
  extra columns ignored; ``.tsv`` (or ``task.delimiter``) for tab-separated exports;
- JSONL: one JSON object per line.

Columns are named in config: ``text_column``, ``label_column`` (integer ids, or names declared in
``class_names``, matched case-insensitively), optional ``split_column`` (``train``/``test``;
``val``/``dev`` count as train) and ``id_column``. Rows without a split value go to test by a
stable hash of their id (of their row number when there is no id column), so the split never
depends on file order or on Python's ``hash()``. A row with an empty text or an empty label is
skipped and counted.

Tokenisation is data-independent: lowercased words (``[^\\W_]+``) and word bigrams are hashed
with crc32 into ``spec.vocab_buckets`` ids; no vocabulary is built from any hospital's notes,
so nothing about one site's wording is needed by another. A note becomes ``max_len×2`` ids
(word id, id of the bigram it starts; 0 = none) plus a padding mask.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
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
)
from client.tasks.registry import register_task

FORMATS = ("csv", "jsonl")
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TRAIN_VALUES = ("train", "training", "val", "valid", "validation", "dev")
TEST_VALUES = ("test", "testing")
CSV_FIELD_LIMIT = 64 * 2**20  # a long note must not trip csv's default 128 KiB field limit

# ---------------------------------------------------------------------------------------------
# Tokenisation: fixed by config (vocab_buckets, max_len), never learned from data.

_WORD = re.compile(r"[^\W_]+")


def note_words(text: str) -> list[str]:
    """Lowercased words: runs of letters/digits in any script (``r/o`` -> ``r``, ``o``)."""
    return _WORD.findall(text.casefold())


@lru_cache(maxsize=2**18)
def _bucket(key: str, vocab_buckets: int) -> int:
    # crc32, not hash(): the same word must get the same id at every site and in every process
    return 1 + zlib.crc32(key.encode("utf-8")) % (vocab_buckets - 1)


def encode_note(text: str, vocab_buckets: int, max_len: int) -> np.ndarray:
    """``n×2`` ids for the first ``n <= max_len`` words: word id, id of the bigram it starts."""
    words = note_words(text)
    n = min(len(words), max_len)
    ids = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        ids[i, 0] = _bucket("w:" + words[i], vocab_buckets)
        if i + 1 < len(words):
            ids[i, 1] = _bucket("b:" + words[i] + " " + words[i + 1], vocab_buckets)
    return ids


def encode_notes(
    texts: Sequence[str], vocab_buckets: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``N×max_len×2`` (int64) and padding mask ``N×max_len`` (bool, True = word)."""
    tokens = np.zeros((len(texts), max_len, 2), dtype=np.int64)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    for row, text in enumerate(texts):
        ids = encode_note(text, vocab_buckets, max_len)
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
    return torch.from_numpy(tokens), torch.from_numpy(mask)


# ---------------------------------------------------------------------------------------------
# Reading files


@dataclass
class _Record:
    line: int  # 1-based line where the record starts (for error messages)
    number: int  # 1-based record number (the hashed split falls back on it)
    fields: dict[str, Any]


@dataclass
class _Note:
    line: int
    text: str | None  # None: missing or empty
    label: int | None  # None: missing or empty
    is_test: bool
    fields: dict[str, Any]


def file_format(path: Path, task_cfg: Mapping[str, Any]) -> str:
    fmt = str(task_cfg.get("format", "auto"))
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"task.format must be one of auto, csv, jsonl; got {fmt!r}")
    if fmt != "auto":
        return fmt
    if path.suffix.lower() not in SUFFIX_FORMATS:
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"expected one of {sorted(SUFFIX_FORMATS)} or set task.format=csv|jsonl")
    return SUFFIX_FORMATS[path.suffix.lower()]


def site_file(folder: Path, task_cfg: Mapping[str, Any]) -> Path:
    """The notes file of a site: ``folder`` itself, ``folder/<task.file>``, or under
    ``format=auto`` the only file with that stem and a notes suffix (notes.jsonl for notes.csv)."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist or is not a directory")
    name = str(task_cfg.get("file", "notes.csv"))
    path = folder / name
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"{path}: a directory; expected a notes file (CSV or JSONL, task.file)")
    if str(task_cfg.get("format", "auto")) == "auto":
        stem = Path(name).stem
        found = [folder / f"{stem}{s}" for s in SUFFIX_FORMATS if (folder / f"{stem}{s}").is_file()]
        if len(found) == 1:
            return found[0]
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise DataError(f"{path}: missing; expected a notes file (CSV or JSONL, task.file) in "
                    f"{folder}; found {present}")


def _read_text(path: Path) -> str:
    # not UTF-8 (latin-1, UTF-16, binary) or NUL bytes: an error naming file and line
    return read_text_file(path, "a notes file (CSV or JSONL)")


def csv_delimiter(path: Path, task_cfg: Mapping[str, Any]) -> str:
    if "delimiter" in task_cfg and task_cfg["delimiter"] not in (None, ","):
        delimiter = str(task_cfg["delimiter"])
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if len(delimiter) != 1:
        raise DataError(f"task.delimiter must be one character; got {delimiter!r}")
    return delimiter


def _read_csv(path: Path, task_cfg: Mapping[str, Any]) -> tuple[list[str], list[_Record]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(_read_text(path), newline=""),
                        delimiter=csv_delimiter(path, task_cfg), strict=True)
    header: list[str] | None = None
    records: list[_Record] = []
    end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from err
        start, end = end + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if header is None:
            header = [name.strip() for name in row]
            duplicates = sorted({n for n in header if header.count(n) > 1})
            if duplicates:
                raise DataError(f"{path}, line {start}: duplicate columns {duplicates} in the "
                                "header row")
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {start}: {len(row)} fields, expected {len(header)} "
                            f"(header: {header}); is a quote not closed or a delimiter extra?")
        records.append(_Record(start, len(records) + 1, dict(zip(header, row, strict=True))))
    if header is None:
        raise DataError(f"{path}: empty; expected a header row naming the columns "
                        f"(text column {task_cfg.get('text_column', 'text')!r}) and one row "
                        "per note")
    return header, records


def _read_jsonl(path: Path) -> tuple[list[str], list[_Record]]:
    columns: dict[str, None] = {}
    records: list[_Record] = []
    # split on \n only: str.splitlines() would also split on U+2028 inside JSON strings
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: malformed JSON ({err.msg}, column "
                            f"{err.colno}); expected one JSON object per line") from err
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(obj).__name__}; expected one "
                            "JSON object per line")
        columns.update(dict.fromkeys(obj))
        records.append(_Record(number, len(records) + 1, obj))
    return list(columns), records


def _read_records(path: Path, task_cfg: Mapping[str, Any]) -> tuple[list[str], list[_Record]]:
    if file_format(path, task_cfg) == "csv":
        return _read_csv(path, task_cfg)
    return _read_jsonl(path)


class LabelMap:
    """Raw label (int, "1", or a declared class name) -> class id; empty -> None."""

    def __init__(self, task_cfg: Mapping[str, Any]) -> None:
        self.num_classes = int(task_cfg["spec"]["num_classes"])
        names = task_cfg.get("class_names")
        self.names = [str(n) for n in names] if names else None
        if self.names is not None and len(self.names) != self.num_classes:
            raise DataError(f"task.class_names has {len(self.names)} names {self.names}; "
                            f"expected task.spec.num_classes={self.num_classes}")
        self.by_name = {n: i for i, n in enumerate(self.names or [])}
        self.by_folded = {n.casefold(): i for i, n in enumerate(self.names or [])}

    def __call__(self, raw: Any, path: Path, line: int) -> int | None:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        value: int | None = None
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str):
            text = raw.strip()
            if text in self.by_name:
                return self.by_name[text]
            if text.casefold() in self.by_folded:
                return self.by_folded[text.casefold()]
            if re.fullmatch(r"[+-]?\d+(\.0*)?", text):
                value = int(float(text))
        if value is not None and 0 <= value < self.num_classes:
            return value
        expected = f"ids 0..{self.num_classes - 1}"
        if self.names:
            expected = f"one of {self.names} (task.class_names) or {expected}"
        raise DataError(f"{path}, line {line}: label {raw!r} is not a declared class; expected "
                        f"{expected} (task.spec.num_classes={self.num_classes})")


def field_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _hashed_is_test(key: str, fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def read_notes(path: Path, task_cfg: Mapping[str, Any]) -> tuple[list[str], list[_Note]]:
    """Every record of ``path`` with its text, class id and split (nothing dropped here)."""
    columns, records = _read_records(path, task_cfg)
    text_col = str(task_cfg.get("text_column", "text"))
    label_col = str(task_cfg.get("label_column", "label"))
    for role, col in (("text", text_col), ("label", label_col)):
        if col not in columns:
            raise DataError(f"{path}: no {role} column {col!r} (task.{role}_column); found "
                            f"columns {columns}")
    split_col = task_cfg.get("split_column")
    split_col = str(split_col) if split_col and str(split_col) in columns else None
    id_col = task_cfg.get("id_column")
    id_col = str(id_col) if id_col and str(id_col) in columns else None
    fraction = float(task_cfg.get("test_fraction", 0.2))
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"task.test_fraction must be in [0, 1); got {fraction}")
    labels = LabelMap(task_cfg)
    notes = []
    for record in records:
        text = record.fields.get(text_col)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}, line {record.line}: {text_col!r} is a "
                            f"{type(text).__name__}; expected the note as a string")
        text = text if text and text.strip() else None
        label = labels(record.fields.get(label_col), path, record.line)
        split = field_text(record.fields.get(split_col)).lower() if split_col else ""
        if split in TEST_VALUES:
            is_test = True
        elif split in TRAIN_VALUES:
            is_test = False
        elif split:
            raise DataError(f"{path}, line {record.line}: {split_col!r} is "
                            f"{record.fields.get(split_col)!r}; expected train or test "
                            f"(val/dev count as train) or empty")
        else:
            row_id = field_text(record.fields.get(id_col)) if id_col else ""
            key = f"id:{row_id}" if row_id else f"row:{record.number}"
            is_test = _hashed_is_test(key, fraction)
        notes.append(_Note(record.line, text, label, is_test, record.fields))
    return columns, notes


def _dataset(texts: list[str], labels: list[int], spec: Mapping[str, Any]) -> TensorDataset:
    tokens, mask = encode_notes(texts, int(spec["vocab_buckets"]), int(spec["max_len"]))
    return TensorDataset(tokens, mask, torch.tensor(labels, dtype=torch.int64))


def check_spec(spec: Mapping[str, Any]) -> None:
    if int(spec["num_classes"]) < 2:
        raise DataError(f"task.spec.num_classes must be >= 2; got {spec['num_classes']}")
    if int(spec["vocab_buckets"]) < 2:
        raise DataError(f"task.spec.vocab_buckets must be >= 2; got {spec['vocab_buckets']}")
    if int(spec["max_len"]) < 1:
        raise DataError(f"task.spec.max_len must be >= 1; got {spec['max_len']}")


@dataclass
class SiteNotes:
    """A site's notes as text, split exactly as :meth:`NotesTask.load_site` splits them (for
    references that need the words, e.g. a TF-IDF baseline; the models get hashed ids)."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    source: str
    skipped: dict[str, int]


def read_site_notes(folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteNotes:
    """Read a site's notes file; the same rows, split and skip counts as ``load_site``."""
    path = site_file(Path(folder), task_cfg)
    _, notes = read_notes(path, task_cfg)
    skipped: Counter[str] = Counter()
    splits: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}
    for note in notes:
        if note.text is None:
            skipped["empty text"] += 1
        elif note.label is None:
            skipped["missing label"] += 1
        elif not note_words(note.text):
            skipped["no words in text"] += 1
        else:
            splits[note.is_test][0].append(note.text)
            splits[note.is_test][1].append(note.label)
    if not splits[False][0]:
        raise DataError(f"site {site_id}: {path} has zero training examples ({len(notes)} "
                        f"rows, {len(splits[True][0])} in the test split, skipped "
                        f"{dict(skipped)})")
    return SiteNotes(*splits[False], *splits[True], source=str(path), skipped=dict(skipped))


@register_task
class NotesTask(Task):
    name = "notes"

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        spec = task_cfg["spec"]
        check_spec(spec)
        notes = read_site_notes(folder, task_cfg, site_id)
        return SiteData(site_id=site_id,
                        train=_dataset(notes.train_texts, notes.train_labels, spec),
                        test=_dataset(notes.test_texts, notes.test_labels, spec),
                        num_classes=int(spec["num_classes"]), source=notes.source,
                        skipped=notes.skipped)
