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
    PooledRecords,
    SiteData,
    SiteProfile,
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


def _file_format(path: Path, task_cfg: Mapping[str, Any]) -> str:
    fmt = str(task_cfg.get("format", "auto"))
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"task.format must be one of auto, csv, jsonl; got {fmt!r}")
    if fmt != "auto":
        return fmt
    if path.suffix.lower() not in SUFFIX_FORMATS:
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"expected one of {sorted(SUFFIX_FORMATS)} or set task.format=csv|jsonl")
    return SUFFIX_FORMATS[path.suffix.lower()]


def _site_file(folder: Path, task_cfg: Mapping[str, Any]) -> Path:
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


def _delimiter(path: Path, task_cfg: Mapping[str, Any]) -> str:
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
                        delimiter=_delimiter(path, task_cfg), strict=True)
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
    if _file_format(path, task_cfg) == "csv":
        return _read_csv(path, task_cfg)
    return _read_jsonl(path)


class _LabelMap:
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


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _hashed_is_test(key: str, fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _read_notes(path: Path, task_cfg: Mapping[str, Any]) -> tuple[list[str], list[_Note]]:
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
    labels = _LabelMap(task_cfg)
    notes = []
    for record in records:
        text = record.fields.get(text_col)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}, line {record.line}: {text_col!r} is a "
                            f"{type(text).__name__}; expected the note as a string")
        text = text if text and text.strip() else None
        label = labels(record.fields.get(label_col), path, record.line)
        split = _as_text(record.fields.get(split_col)).lower() if split_col else ""
        if split in TEST_VALUES:
            is_test = True
        elif split in TRAIN_VALUES:
            is_test = False
        elif split:
            raise DataError(f"{path}, line {record.line}: {split_col!r} is "
                            f"{record.fields.get(split_col)!r}; expected train or test "
                            f"(val/dev count as train) or empty")
        else:
            row_id = _as_text(record.fields.get(id_col)) if id_col else ""
            key = f"id:{row_id}" if row_id else f"row:{record.number}"
            is_test = _hashed_is_test(key, fraction)
        notes.append(_Note(record.line, text, label, is_test, record.fields))
    return columns, notes


def _dataset(texts: list[str], labels: list[int], spec: Mapping[str, Any]) -> TensorDataset:
    tokens, mask = encode_notes(texts, int(spec["vocab_buckets"]), int(spec["max_len"]))
    return TensorDataset(tokens, mask, torch.tensor(labels, dtype=torch.int64))


def _check_spec(spec: Mapping[str, Any]) -> None:
    if int(spec["num_classes"]) < 2:
        raise DataError(f"task.spec.num_classes must be >= 2; got {spec['num_classes']}")
    if int(spec["vocab_buckets"]) < 2:
        raise DataError(f"task.spec.vocab_buckets must be >= 2; got {spec['vocab_buckets']}")
    if int(spec["max_len"]) < 1:
        raise DataError(f"task.spec.max_len must be >= 1; got {spec['max_len']}")


def _write_notes(path: Path, task_cfg: Mapping[str, Any], columns: list[str],
                 rows: list[Mapping[str, Any]]) -> None:
    """Write rows in the format ``path`` has under ``task_cfg`` (the site format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _file_format(path, task_cfg) == "jsonl":
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({c: row.get(c) for c in columns if c in row},
                                     ensure_ascii=False) + "\n")
        return
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, delimiter=_delimiter(path, task_cfg))
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else
                             (json.dumps(row[c]) if isinstance(row[c], (dict, list)) else row[c])
                             for c in columns])


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
    path = _site_file(Path(folder), task_cfg)
    _, notes = _read_notes(path, task_cfg)
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
        _check_spec(spec)
        notes = read_site_notes(folder, task_cfg, site_id)
        return SiteData(site_id=site_id,
                        train=_dataset(notes.train_texts, notes.train_labels, spec),
                        test=_dataset(notes.test_texts, notes.test_labels, spec),
                        num_classes=int(spec["num_classes"]), source=notes.source,
                        skipped=notes.skipped)

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        """Records are the labelled rows (unlabelled rows cannot be dealt out by label); rows
        with an empty text stay records, so the site that gets them counts them as skipped."""
        path = _site_file(Path(path), task_cfg)
        columns, notes = _read_notes(path, task_cfg)
        if site_column and site_column not in columns:
            raise DataError(f"{path}: no site column {site_column!r} (data.site_column); found "
                            f"columns {columns}")
        notes = [n for n in notes if n.label is not None]
        groups = None
        if site_column:
            groups = np.array([_as_text(n.fields.get(site_column)) for n in notes], dtype=object)
        return PooledRecords(
            labels=np.array([n.label for n in notes], dtype=np.int64),
            is_test=np.array([n.is_test for n in notes], dtype=bool),
            groups=groups,
        )

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        split_col = task_cfg.get("split_column")
        if not split_col:
            raise DataError("writing a partition needs task.split_column (each site's file "
                            "records its rows' train/test membership there)")
        source = _site_file(Path(path), task_cfg)
        columns, notes = _read_notes(source, task_cfg)
        notes = [n for n in notes if n.label is not None]
        if str(split_col) not in columns:
            columns = [*columns, str(split_col)]
        rows = [{**notes[i].fields, str(split_col): "test" if notes[i].is_test else "train"}
                for i in np.asarray(records, dtype=np.int64)]
        _write_notes(Path(folder) / str(task_cfg.get("file", "notes.csv")), task_cfg,
                     columns, rows)

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        rng = np.random.default_rng([seed, profile.index, 3])
        _check_spec(task_cfg["spec"])
        _LabelMap(task_cfg)  # class_names must match num_classes before names are written
        num_classes = int(task_cfg["spec"]["num_classes"])
        if num_classes > len(CONDITIONS) + 1:
            raise DataError(f"the synthetic notes generator knows {len(CONDITIONS)} conditions "
                            f"(+ other); task.spec.num_classes={num_classes} is too many")
        style = NoteStyle.from_shift(profile.shift)
        names = task_cfg.get("class_names")
        text_col = str(task_cfg.get("text_column", "text"))
        label_col = str(task_cfg.get("label_column", "label"))
        split_col = str(task_cfg.get("split_column") or "split")
        id_col = str(task_cfg.get("id_column") or "note_id")
        columns = [id_col, "subject_id", "chartdate", "category", text_col, label_col, split_col]
        splits = ["train"] * profile.num_train + ["test"] * profile.num_test
        rng.shuffle(splits)
        rows = []
        for i, split in enumerate(splits):
            label = int(rng.choice(len(profile.class_weights), p=profile.class_weights))
            content = label
            if rng.uniform() < LABEL_NOISE:  # the recorded label disagrees with the note
                content = int((label + rng.integers(1, num_classes)) % num_classes)
            if rng.uniform() < 0.015:  # realistic mess: a few exported rows have no text
                text = "" if rng.uniform() < 0.6 else " "
            else:
                text = synthetic_note(content, num_classes, style, rng)
            rows.append({
                id_col: f"{profile.index + 1:02d}-{100000 + 7 * i + int(rng.integers(7))}",
                "subject_id": int(rng.integers(10_000, 99_999)),
                "chartdate": f"2131-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}",
                "category": "Discharge summary",
                text_col: text,
                label_col: str(names[label]) if names else label,
                split_col: split,
            })
        _write_notes(Path(folder) / str(task_cfg.get("file", "notes.csv")), task_cfg,
                     columns, rows)


# ---------------------------------------------------------------------------------------------
# Synthetic discharge notes
#
# What makes them hard, as real discharge notes are (each measured in docs/utility.md):
# - two in five pneumonia notes never name it: findings and treatment only, and every such
#   finding also appears in notes of other diagnoses (bronchitis, influenza, heart failure,
#   atelectasis, aspiration pneumonitis, urinary sepsis);
# - notes of other diagnoses name pneumonia often: negated ("no evidence of pneumonia"),
#   ruled out after an initial concern, in the history ("prior admission with pneumonia");
# - each hospital has its own wording (infiltrate or airspace opacity, rales or crackles, its
#   antibiotics): a site sees only part of the vocabulary the pooled test set uses;
# - labels from billing codes or chart review disagree with the note now and then, and notes
#   that only say "possible pneumonia" are labelled either way.


@dataclass(frozen=True)
class NoteStyle:
    """A hospital's writing style, the site shift of the notes task."""

    abbreviation: float  # probability that a term is written abbreviated (PNA, CHF, SOB, w/)
    template: int  # 0: CAPS section headers, 1: dashed headers and bullets, 2: one paragraph
    filler: tuple[int, int]  # note length: hospital course of 40 + 5*k words, k in this range
    typo_rate: float  # per-word probability of a typo
    negation: int  # preferred phrasing of a negated finding
    lexicon: int  # which synonym of each WORDING group this hospital prefers (a seed)

    @classmethod
    def from_shift(cls, shift: Mapping[str, float]) -> NoteStyle:
        u, v, w = float(shift["u"]), float(shift["v"]), float(shift["w"])
        low = 1 + int(5 * v)
        return cls(
            abbreviation=0.05 + 0.9 * u,
            template=min(2, int(3 * ((u + 2 * v + 3 * w) % 1.0))),
            filler=(low, low + 2 + int(8 * w)),
            typo_rate=0.04 * w,
            negation=min(2, int(3 * ((u + w) % 1.0))),
            lexicon=zlib.crc32(f"{u:.6f} {v:.6f} {w:.6f}".encode()),
        )

    def preferred(self, group: str) -> int:
        """This hospital's own word for ``group`` (an index into ``WORDING[group]``)."""
        return zlib.crc32(f"{group}:{self.lexicon}".encode()) % len(WORDING[group])


# Terms written spelled out or abbreviated depending on the site's style.
TERMS: dict[str, tuple[str, str]] = {
    "pt": ("the patient", "pt"), "pna": ("pneumonia", "PNA"),
    "cap": ("community-acquired pneumonia", "CAP"), "chf": ("congestive heart failure", "CHF"),
    "hf": ("heart failure", "HF"), "copd": ("chronic obstructive pulmonary disease", "COPD"),
    "sob": ("shortness of breath", "SOB"), "doe": ("dyspnea on exertion", "DOE"),
    "cxr": ("chest x-ray", "CXR"), "hx": ("history of", "h/o"), "w": ("with", "w/"),
    "wo": ("without", "w/o"), "ro": ("was ruled out", "r/o"), "abx": ("antibiotics", "abx"),
    "iv": ("intravenous", "IV"), "wbc": ("white blood cell count", "WBC"),
    "le": ("lower extremity", "LE"), "bid": ("twice daily", "BID"), "fu": ("follow up", "f/u"),
    "pcp": ("primary care physician", "PCP"), "ed": ("emergency department", "ED"),
    "ef": ("ejection fraction", "EF"), "bnp": ("BNP", "BNP"),
    "uti": ("urinary tract infection", "UTI"), "afib": ("atrial fibrillation", "AFib"),
    "htn": ("hypertension", "HTN"), "dm": ("diabetes mellitus", "DM"),
    "ckd": ("chronic kidney disease", "CKD"), "yo": ("year-old", "yo"),
    "rll": ("right lower lobe", "RLL"), "lll": ("left lower lobe", "LLL"),
    "pe": ("pulmonary embolism", "PE"), "ct": ("CT", "CT"),
}
# Synonyms: each hospital writes its own one most of the time (NoteStyle.preferred), so the
# words that signal a finding differ between sites.
WORDING: dict[str, tuple[str, ...]] = {
    "opacity": ("consolidation", "infiltrate", "airspace opacity", "airspace disease"),
    "crackles": ("crackles", "rales", "coarse breath sounds", "rhonchi"),
    "sputum": ("productive cough", "cough productive of yellow sputum", "purulent sputum",
               "wet cough"),
    "febrile": ("febrile to {temp}", "Tmax {temp}", "temperature of {temp}", "fever to {temp}"),
    "hypoxia": ("required 2 liters nasal cannula", "hypoxic to 88 percent on room air",
                "desaturated to 89 percent and was placed on oxygen", "a new oxygen requirement"),
    "leukocytosis": ("{wbc} {wbc_value}", "leukocytosis to {wbc_value}",
                     "procalcitonin {pct_value}", "left shift {w} {wbc} {wbc_value}"),
    "abx_course": ("ceftriaxone and azithromycin", "levofloxacin", "vancomycin and cefepime",
                   "amoxicillin-clavulanate", "doxycycline"),
    "pna_name": ("{pna}", "{cap}", "{lobe} {pna}", "lobar pneumonia", "multifocal pneumonia",
                 "bronchopneumonia"),
}
SITE_WORDING = 0.8  # share of a group's mentions in the hospital's own word
NUMBERS = {
    "age": lambda r: str(int(r.integers(28, 95))),
    "days": lambda r: str(int(r.integers(3, 8))),
    "temp": lambda r: f"{r.uniform(38.1, 39.8):.1f}",
    "wbc_value": lambda r: f"{r.uniform(11, 21):.1f}",
    "pct_value": lambda r: f"{r.uniform(0.6, 4.0):.1f}",
    "bnp_value": lambda r: str(int(r.integers(600, 3000))),
    "ef_value": lambda r: str(int(r.integers(15, 40))),
    "year": lambda r: str(int(r.integers(2118, 2130))),
    "sex": lambda r: "man" if r.uniform() < 0.5 else "woman",
    "side": lambda r: "right" if r.uniform() < 0.5 else "left",
    "lobe": lambda r: "{rll}" if r.uniform() < 0.6 else "{lll}",
}


@dataclass(frozen=True)
class Condition:
    name: str  # the term key of its name, for negated and historical mentions
    complaint: tuple[str, ...]
    strong: tuple[str, ...]  # sentences that state the condition
    support: tuple[str, ...]  # findings that suggest it (each shared with other diagnoses)
    diagnosis: tuple[str, ...]  # discharge diagnosis lines
    vague: tuple[str, ...]  # discharge diagnosis lines of a note that never names it


PNEUMONIA_FINDINGS = (
    "Presented {w} {sputum} and {febrile}.", "{crackles} at the {side} base.",
    "{leukocytosis} on admission.", "{hypoxia}, weaned to room air.",
    "Pleuritic chest pain and {sob}.", "Blood cultures no growth to date.",
    "{cxr} {w} {lobe} {opacity}.", "Started on {abx_course}.",
    "Completed a {days} day course of {abx_course}.", "{sputum} improved on {abx}.",
)
CONDITIONS = (
    Condition(
        "pna", ("cough and fever", "{sob}", "fever", "{sputum}"),
        ("Admitted {w} {pna_name}.", "{cxr} showed {lobe} {opacity} consistent {w} {pna_name}.",
         "Treated for {pna_name} {w} {abx_course}.",
         "{pna_name} improved on {abx} and {pt} was transitioned to oral levofloxacin.",
         "Sputum culture grew streptococcus pneumoniae.",
         "Completed a {days} day course of {abx} for {pna_name}.",
         "{lobe} {opacity} on imaging, started on {abx} for {pna_name}."),
        PNEUMONIA_FINDINGS,
        ("{pna_name}",),
        ("lower respiratory tract infection", "sepsis", "acute hypoxic respiratory failure",
         "cough and fever"),
    ),
    Condition(
        "chf", ("{sob}", "leg swelling", "{doe}"),
        ("Admitted for acute on chronic systolic {chf} exacerbation.",
         "Diuresed {w} {iv} furosemide, net negative {days} liters.",
         "{cxr} showed pulmonary edema and small bilateral effusions.",
         "{bnp} elevated at {bnp_value}.", "Echo {w} {ef} of {ef_value} percent.",
         "Volume overloaded {w} bilateral {le} edema and orthopnea.",
         "Discharged on a higher dose of torsemide for {hf}."),
        ("{sob} and {doe} for one week.", "{crackles} at the {side} base.", "Weight up 4 kg.",
         "Jugular venous distension on exam.", "{hypoxia}, weaned to room air."),
        ("acute on chronic {chf}", "{hf} exacerbation", "decompensated {chf}"),
        ("volume overload", "acute hypoxic respiratory failure"),
    ),
    Condition(
        "copd", ("{sob}", "wheezing", "cough"),
        ("Admitted {w} {copd} exacerbation.", "Diffuse expiratory wheezing on exam.",
         "Treated {w} nebulized albuterol and ipratropium and a prednisone burst.",
         "{cxr} {wo} focal {opacity}, hyperinflated lungs.",
         "{copd} on home oxygen, active smoker."),
        ("{sob} and wheezing.", "{sputum} {w} increased sputum.",
         "Completed a {days} day course of azithromycin.", "{hypoxia}, weaned to room air.",
         "Started on doxycycline."),
        ("{copd} exacerbation", "acute exacerbation of {copd}"),
        ("hypoxic respiratory failure", "bronchospasm"),
    ),
)
# Negative notes: (complaints, hospital course, discharge diagnosis). The respiratory mimics
# share the findings, images and antibiotics of pneumonia without being pneumonia.
RESPIRATORY_MIMICS = (
    (("cough and fever", "fever"),
     ("Viral upper respiratory infection {w} cough and {febrile}.",
      "Influenza swab positive, started oseltamivir.", "{cxr} {wo} {opacity}."),
     "influenza"),
    (("cough", "{sputum}"),
     ("Acute bronchitis {w} {sputum}.", "{cxr} clear.",
      "Treated {w} albuterol and a {days} day course of {abx_course}."),
     "acute bronchitis"),
    (("{sob}",),
     ("Postoperative {cxr} {w} {lobe} opacity, felt to be atelectasis.",
      "Incentive spirometry, {hypoxia} resolved.", "Repeat imaging {w} resolution."),
     "atelectasis"),
    (("cough", "{sob}"),
     ("Witnessed aspiration event at the nursing facility.",
      "{cxr} {w} {lobe} {opacity}, felt to be chemical pneumonitis, {abx} were not started.",
      "Speech and swallow evaluation, diet modified."),
     "aspiration pneumonitis"),
    (("pleuritic chest pain", "{sob}"),
     ("{ct} angiogram showed a {side} segmental {pe}.", "{hypoxia}, weaned to room air.",
      "Started on apixaban."),
     "{pe}"),
    (("cough",),
     ("{cxr} {w} {lobe} opacity, {ct} chest showed a spiculated mass.",
      "Bronchoscopy biopsy pending, referred to oncology."),
     "lung mass"),
)
OTHER_DIAGNOSES = (
    (("leg redness", "fever"),
     ("Admitted {w} left leg cellulitis.",
      "Treated {w} {iv} vancomycin and cefepime, erythema receding.", "{febrile}."),
     "cellulitis"),
    (("dysuria", "fever"),
     ("{uti} {w} pyuria, urine culture grew e coli.", "{leukocytosis}, {febrile}.",
      "Treated {w} ceftriaxone then oral cephalexin."),
     "{uti}"),
    (("chest pain",),
     ("Admitted for chest pain.", "Acute coronary syndrome {ro} {w} serial troponins."),
     "atypical chest pain"),
    (("black stools",),
     ("Admitted {w} melena.", "EGD showed a duodenal ulcer, started on pantoprazole {bid}."),
     "upper GI bleed"),
    (("fall",),
     ("Admitted after a syncopal episode.",
      "Telemetry unremarkable, orthostatic vital signs positive."),
     "syncope"),
    (("nausea and vomiting",),
     ("Admitted {w} diabetic ketoacidosis.", "Anion gap closed on an insulin drip."),
     "DKA"),
    (("palpitations",),
     ("{afib} {w} rapid ventricular response.",
      "Rate controlled {w} metoprolol, started apixaban."),
     "{afib} with RVR"),
)
NEGATIONS = ("{cxr} {wo} evidence of {X}.", "Negative for {X}.", "{X} {ro}.")
HISTORY = ("Remote {hx} {X}.", "Family {hx} {X}.", "Prior admission {w} {X} in {year}.",
           "{hx} {X} requiring intubation in {year}.")
# Discharge diagnoses that name no condition: hard positives end on one of these, and so do
# many notes of other diagnoses (DISCHARGE_VAGUE of them).
VAGUE_DIAGNOSES = ("lower respiratory tract infection", "sepsis",
                   "acute hypoxic respiratory failure", "cough and fever", "{sob}")
DISCHARGE_VAGUE = 0.4
# Sentences a pneumonia note may share with a mimic: pneumonia after influenza, on COPD, after
# aspiration (aspiration pneumonia, where the mimic is aspiration pneumonitis).
COMPLICATED_BY = ("Influenza swab positive, started oseltamivir.", "{copd} on home oxygen.",
                  "Witnessed aspiration event at the nursing facility.",
                  "{cxr} {w} small bilateral effusions.")
HEDGES = ("Possible early {pna} on {cxr}, treated empirically {w} {abx_course}.",
          "Cannot exclude {pna}, {abx} were continued.",
          "Initial concern for {pna}, however {cxr} was clear and {abx} were stopped.")
FILLERS = (
    "Vital signs stable.", "Tolerating a regular diet.", "Ambulating independently {w} PT.",
    "Home medications were resumed.", "{fu} {w} {pcp} in 1 week.",
    "Labs notable for mild hyponatremia.", "Seen by case management.",
    "{pt} remained hemodynamically stable.", "Glucose controlled {w} sliding scale insulin.",
    "Code status full code.", "No acute events overnight.", "Pain controlled {w} acetaminophen.",
    "DVT prophylaxis {w} heparin.", "Seen in the {ed} and admitted to medicine.",
    "Pneumococcal and influenza vaccines up to date.", "Physical therapy recommended rehab.",
)
COMORBIDITIES = ("{htn}", "{dm}", "{ckd}", "{afib}", "hyperlipidemia", "obesity", "{copd}", "{chf}")
# Labels taken from billing codes or chart review disagree with the note text now and then.
LABEL_NOISE = 0.07
HARD_POSITIVE = 0.4  # share of positive notes that name no diagnosis, only findings
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(
    sentence: str, style: NoteStyle, rng: np.random.Generator, extra: Mapping[str, str]
) -> str:
    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key in extra:
            return _fill(extra[key], style, rng, {})
        if key in NUMBERS:
            return _fill(NUMBERS[key](rng), style, rng, {})
        if key in WORDING:
            variants = WORDING[key]
            own = rng.uniform() < SITE_WORDING
            pick = style.preferred(key) if own else int(rng.integers(len(variants)))
            return _fill(variants[pick], style, rng, {})
        spelled, short = TERMS[key]
        return short if rng.uniform() < style.abbreviation else spelled

    return _PLACEHOLDER.sub(fill, sentence)


def _render(sentence: str, style: NoteStyle, rng: np.random.Generator, **extra: str) -> str:
    """Fill ``{term}`` placeholders in the site's style; capitalise the sentence."""
    text = _fill(sentence, style, rng, extra)
    return text[:1].upper() + text[1:]


def _typos(text: str, rate: float, rng: np.random.Generator) -> str:
    if rate <= 0:
        return text
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 3 and word.isalpha() and rng.uniform() < rate:
            j = int(rng.integers(1, len(word) - 1))
            kind = rng.integers(3)
            if kind == 0:
                word = word[: j - 1] + word[j] + word[j - 1] + word[j + 1 :]  # swap
            elif kind == 1:
                word = word[:j] + word[j + 1 :]  # drop
            else:
                word = word[:j] + word[j] + word[j:]  # double
            words[i] = word
    return " ".join(words)


def _pick(rng: np.random.Generator, items: Sequence[Any], k: int = 1) -> list[Any]:
    k = max(0, min(k, len(items)))
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def synthetic_note(
    label: int, num_classes: int, style: NoteStyle, rng: np.random.Generator
) -> str:
    """A discharge-summary-like note whose class is the primary diagnosis.

    Class k >= 1 is condition ``CONDITIONS[k-1]`` (pneumonia, heart failure, COPD); class 0
    is anything else: conditions that are not classes (in the binary task heart failure and
    COPD), respiratory mimics (influenza, bronchitis, atelectasis, aspiration pneumonitis,
    pulmonary embolism, a lung mass) and other admissions. See the section comment above for
    what makes the classes overlap.
    """
    classes = CONDITIONS[: num_classes - 1]

    def r(sentence: str, **extra: str) -> str:
        return _render(sentence, style, rng, **extra)

    course: list[str] = []
    if label >= 1:
        cond = classes[label - 1]
        complaint = _pick(rng, cond.complaint)[0]
        if rng.uniform() < HARD_POSITIVE:  # findings only, the diagnosis never named
            course += _pick(rng, cond.support, int(rng.integers(2, 5)))
            diagnosis = _pick(rng, cond.vague)[0]
            if cond.name == "pna" and rng.uniform() < 0.2:
                course.append(_pick(rng, HEDGES[:2])[0])
        else:
            course += _pick(rng, cond.strong, int(rng.integers(1, 3)))
            course += _pick(rng, cond.support, int(rng.integers(0, 3)))
            diagnosis = _pick(rng, cond.diagnosis)[0]
        if cond.name == "pna" and rng.uniform() < 0.3:
            course.append(_pick(rng, COMPLICATED_BY)[0])
        others = [c for c in CONDITIONS if c is not cond]
        negated = 0.35
    else:
        non_class = CONDITIONS[num_classes - 1 :]
        kind = rng.uniform()
        if non_class and kind < 0.2:
            cond = non_class[int(rng.integers(len(non_class)))]
            complaint = _pick(rng, cond.complaint)[0]
            course += _pick(rng, cond.strong, int(rng.integers(1, 4)))
            course += _pick(rng, cond.support, 1)
            diagnosis = _pick(rng, cond.diagnosis)[0]
        elif classes and kind < 0.35:  # an unexplained illness: findings, no diagnosis named
            cond = classes[int(rng.integers(len(classes)))]
            complaint = _pick(rng, cond.complaint)[0]
            course += _pick(rng, cond.support, int(rng.integers(1, 4)))
            diagnosis = _pick(rng, VAGUE_DIAGNOSES)[0]
        else:
            pool = RESPIRATORY_MIMICS if kind < 0.65 else OTHER_DIAGNOSES
            complaints, sentences, diagnosis = pool[int(rng.integers(len(pool)))]
            complaint = _pick(rng, complaints)[0]
            course += _pick(rng, sentences, int(rng.integers(len(sentences) - 1,
                                                             len(sentences) + 1)))
        others = list(classes)
        negated = 0.45
        if rng.uniform() < DISCHARGE_VAGUE:
            diagnosis = _pick(rng, VAGUE_DIAGNOSES)[0]
        if classes and rng.uniform() < 0.55:  # findings of a class without the condition
            cond = classes[int(rng.integers(len(classes)))]
            course += _pick(rng, cond.support, int(rng.integers(1, 4)))
        if classes and classes[0].name == "pna" and rng.uniform() < 0.12:
            course.append(_pick(rng, HEDGES)[0])
    for other in others:  # negated mentions: a bag of words sees the condition's name here too
        if rng.uniform() < negated:
            phrasing = (NEGATIONS[style.negation] if rng.uniform() < 0.7
                        else _pick(rng, NEGATIONS)[0])
            course.append(r(phrasing, X="{" + other.name + "}"))
    if rng.uniform() < 0.2:
        course.append(r(_pick(rng, HISTORY)[0], X="{" + _pick(rng, CONDITIONS)[0].name + "}"))
    course = [r(s) for s in course]
    # Routine sentences fill the hospital course up to a length set by the site's style, not
    # by the diagnosis: note length must not give the label away.
    low, high = style.filler
    target = 40 + 5 * int(rng.integers(low, high + 1))
    words = sum(len(s.split()) for s in course)
    for filler in _pick(rng, FILLERS, len(FILLERS)):
        if words >= target:
            break
        course.append(r(filler))
        words += len(course[-1].split())
    order = rng.permutation(len(course))
    course = [course[i] for i in order]
    comorbidities = _pick(rng, COMORBIDITIES, 2)
    intro = r("{pt} is a {age} {yo} {sex} {w} {hx} {a} and {b} who presents {w} {c}.",
              a=comorbidities[0], b=comorbidities[1], c=complaint)
    dx = r(diagnosis)
    if style.template == 0:
        text = (f"CHIEF COMPLAINT: {r(complaint)}\nHISTORY OF PRESENT ILLNESS: {intro}\n"
                f"HOSPITAL COURSE: {' '.join(course)}\n"
                f"DISCHARGE DIAGNOSES: 1. {dx} 2. {r(comorbidities[0])}\n"
                f"DISCHARGE CONDITION: stable.")
    elif style.template == 1:
        bullets = "\n".join(f"- {s}" for s in course)
        text = (f"Chief complaint - {r(complaint)}\n{intro}\nBrief hospital course -\n{bullets}\n"
                f"Dx - {dx}\nDispo - home")
    else:
        text = f"{intro} {' '.join(course)} Discharged home in stable condition, dx {dx}."
    return _typos(text, style.typo_rate, rng)
