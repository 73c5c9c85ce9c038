"""Bad input inventory (issue 8, item 5): what hospitals really send, and what they then see.

Every loader and entry point is fed the bad inputs of the tasks issue plus broken files (an npz
cut in half, binary garbage or latin-1 bytes in a CSV, a directory where a file belongs and the
reverse, empty files, NaN/Inf, wrong shapes and dtypes, labels out of range, unknown config
values). Each must end in one clear error naming the file (and the line where there is one) and
what was expected: a :class:`DataError` from the loaders, exit code 2 from the CLI. Never a raw
``BadZipFile``/``UnicodeDecodeError``/pickle/numpy error, never a silently half-loaded site: what
a loader leaves out on purpose (a NaN or Inf measurement) is counted in ``SiteData.skipped``.

A valid site comes from each task's own synthetic generator (``simulations/synthetic/``); one
file is then corrupted.
docs/bad_inputs.md lists every case id below (``test_the_docs_table_lists_every_case``).
"""

from __future__ import annotations

import copy
import csv
import functools
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

from client.tasks import DataError, get_task
from server.settings import compose
from simulations.sites import site_folders
from simulations.synthetic import get_generator
from tests.helpers import ROOT

TASKS = ("images", "vitals", "notes", "tabular")
DOCS = ROOT / "docs" / "bad_inputs.md"


@pytest.fixture(scope="module")
def task_cfgs() -> dict[str, dict[str, Any]]:
    """Each task's default config at tiny synthetic sizes (a site of ~10-30 records)."""
    return {t: compose([f"task={t}", "task.synthetic.train_size=12",
                        "task.synthetic.test_size=6"])["task"] for t in TASKS}


def _generate(task: str, task_cfg: dict[str, Any], folder: Path) -> Path:
    """A valid site in the task's real format, written by its own synthetic generator."""
    generator = get_generator(task)
    generator.generate_site(folder, task_cfg, generator.site_profiles(task_cfg, 1, seed=0)[0],
                            seed=0)
    return folder


# --------------------------------------------------------------------------- ways to break a file


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cut_mid_line(path: Path, keep: int = 8) -> Path:
    """A copy interrupted mid-line: the first half of the lines and ``keep`` bytes of the next."""
    lines = path.read_bytes().split(b"\n")
    half = len(lines) // 2
    path.write_bytes(b"\n".join(lines[:half]) + b"\n" + lines[half][:keep])
    return path


def _flip_bytes(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _garbage_bytes(n: int = 300) -> bytes:
    """Binary garbage that is not UTF-8 and holds no NUL or newline (deterministic)."""
    return bytes(np.random.default_rng(7).integers(0x80, 0x100, n, dtype=np.uint8))


def _replace_line(path: Path, number: int, content: bytes) -> Path:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = content
    path.write_bytes(b"\n".join(lines))
    return path


def _garbage_at_line_3(path: Path) -> Path:
    return _replace_line(path, 3, _garbage_bytes())


def _latin1_at_line_4(path: Path) -> Path:
    """What a latin-1/Windows-1252 export of a French or German hospital looks like."""
    lines = path.read_bytes().split(b"\n")
    return _replace_line(path, 4, lines[3] + " Sant\u00e9".encode("latin-1"))


def _utf16(bom: bool) -> Callable[[Path], Path]:
    def encode(path: Path) -> Path:
        text = path.read_text(encoding="utf-8")
        path.write_bytes(text.encode("utf-16" if bom else "utf-16-le"))
        return path
    return encode


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _directory(path: Path) -> Path:
    """A directory where a file was expected (an unzipped archive, a copy gone wrong)."""
    path.unlink()
    path.mkdir()
    return path


def _file_instead_of_folder(path: Path) -> Path:
    import shutil

    shutil.rmtree(path)
    path.write_text("not a folder\n")
    return path


def _edit_field(path: Path, line: int, column: int, value: str) -> Path:
    lines = path.read_text(encoding="utf-8").split("\n")
    fields = lines[line - 1].split(",")
    fields[column] = value
    lines[line - 1] = ",".join(fields)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _append_line(path: Path, line: str) -> Path:
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n") + "\n" + line + "\n",
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------- files of each task


def _npz(site: Path) -> Path:
    return site / "scans.npz"


def _npz_with(**changes: Any) -> Callable[[Path], Path]:
    """Rewrite the site's npz with some arrays changed (a callable gets the old arrays; None
    removes the key)."""
    def rewrite(site: Path) -> Path:
        with np.load(_npz(site)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for key, value in changes.items():
            value = value(arrays) if callable(value) else value
            if value is None:
                arrays.pop(key)
            else:
                arrays[key] = value
        np.savez(_npz(site), **arrays)
        return _npz(site)
    return rewrite


def _image_folder(site: Path) -> Path:
    """A valid train|test/<class>/*.png site (the generator writes npz; folders are made here)."""
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("normal", "opacity"):
            (site / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                    site / split / cls / f"{i}.png")
    return site


def _png(site: Path) -> Path:
    return site / "train" / "opacity" / "1.png"


def _npy_renamed_npz(path: Path) -> Path:
    np.save(path.with_suffix(".npy"), np.zeros(3))
    return path.with_suffix(".npy").replace(path)


def _loose_image(site: Path) -> Path:
    """An image dropped into train/ itself: it has no class, so no label."""
    _png(_image_folder(site)).replace(site / "train" / "loose.png")
    return site / "train"


def _one_image_32x32(site: Path) -> Path:
    Image.new("L", (32, 32)).save(_png(_image_folder(site)))
    return site / "train"


def _undeclared_class_folder(site: Path) -> Path:
    return (_image_folder(site) / "train" / "opacity").rename(site / "train" / "nodule")


def _outcomes(site: Path) -> Path:
    return site / "Outcomes-a.txt"


def _record(site: Path) -> Path:
    """The first stay's record (the first row of the outcomes file, so it is always read)."""
    return sorted((site / "set-a").glob("*.txt"))[0]


def _long_csv_site(site: Path, events: str) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    (site / "events.csv").write_text("stay_id,time_hours,variable,value\n" + events)
    (site / "labels.csv").write_text("stay_id,label\n7,0\n8,1\n")
    return site / "events.csv"


def _notes_csv(site: Path, rows: list[tuple[str, ...]],
               header: tuple[str, ...] = ("note_id", "text", "label", "split")) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    with (site / "notes.csv").open("w", newline="", encoding="utf-8") as out:
        csv.writer(out).writerows([header, *rows])
    return site / "notes.csv"


def _table(site: Path) -> Path:
    return next(site.glob("processed.*.data"))


# --------------------------------------------------------------------------- loader cases


@dataclass(frozen=True)
class Case:
    """One bad input: ``corrupt(site)`` breaks a valid site and returns the path the error must
    name; ``expect`` is a regex the message must contain (with the line number where the
    format has lines)."""

    id: str
    task: str
    corrupt: Callable[[Path], Path]
    expect: str
    generate: bool = True  # start from the task's synthetic site (else corrupt() writes it)
    cfg: dict[str, Any] = field(default_factory=dict)  # task config changes (generate + load)
    load_cfg: dict[str, Any] = field(default_factory=dict)  # task config changes for loading
    load_bad: bool = False  # load the returned path itself (else the site folder)
    names_file: bool = True  # a config mistake names the key, not a file


NPZ_EXPECTED = r"expected a MedMNIST-style \.npz archive"
LOADER_CASES = [
    # images: MedMNIST-style npz
    Case("images/npz-cut-in-half", "images", lambda s: _cut_in_half(_npz(s)),
         r"not a readable \.npz file \(BadZipFile: .*\); " + NPZ_EXPECTED),
    Case("images/npz-corrupted-bytes", "images", lambda s: _flip_bytes(_npz(s)),
         r"not a readable \.npz file \(BadZipFile: Bad CRC-32"),
    Case("images/npz-binary-garbage", "images", lambda s: _write(_npz(s), _garbage_bytes()),
         r"not a zip archive; " + NPZ_EXPECTED),
    Case("images/npz-empty-file", "images", lambda s: _empty(_npz(s)),
         r"an empty file \(0 bytes\); " + NPZ_EXPECTED),
    Case("images/npz-is-a-directory", "images", lambda s: _directory(_npz(s)),
         r"scans\.npz: a directory; " + NPZ_EXPECTED),
    Case("images/npy-renamed-to-npz", "images", lambda s: _npy_renamed_npz(_npz(s)),
         r"a single \.npy array; " + NPZ_EXPECTED),
    Case("images/npz-pickled-object-array", "images",
         _npz_with(train_labels=np.array([{"label": 1}] * 3, dtype=object)),
         r"not a readable \.npz file \(ValueError: Object arrays cannot be loaded"),
    Case("images/npz-missing-key", "images", _npz_with(test_labels=None),
         r"missing keys \['test_labels'\]; found .*expected \('train_images'"),
    Case("images/images-float-with-nan", "images",
         _npz_with(train_images=lambda a: np.full(a["train_images"].shape, np.nan, np.float32)),
         r"train_images has dtype float32; expected uint8"),
    Case("images/images-wrong-size", "images",
         _npz_with(train_images=lambda a: np.zeros((len(a["train_images"]), 32, 32), np.uint8)),
         r"train_images has shape \(\d+, 32, 32\); expected N×28×28 \(task\.spec\.image_size=28"),
    Case("images/images-0-d-array", "images", _npz_with(train_images=np.uint8(3)),
         r"train_images has shape \(\); expected N×28×28"),
    Case("images/labels-float-with-nan", "images",
         _npz_with(train_labels=lambda a: np.full(len(a["train_labels"]), np.nan)),
         r"train_labels has dtype float64; expected integers"),
    Case("images/labels-out-of-range", "images",
         _npz_with(train_labels=lambda a: np.where(np.arange(len(a["train_labels"])) == 3, 5,
                                                   a["train_labels"][:, 0])),
         r"train_labels\[3\] = 5 is outside the declared classes 0\.\.1 "
         r"\(task\.spec\.num_classes=2\)"),
    Case("images/labels-negative", "images",
         _npz_with(test_labels=lambda a: -np.ones(len(a["test_labels"]), np.int64)),
         r"test_labels\[0\] = -1 is outside the declared classes 0\.\.1"),
    Case("images/labels-two-columns", "images",
         _npz_with(train_labels=lambda a: np.zeros((len(a["train_labels"]), 2), np.uint8)),
         r"train_labels has shape \((\d+), 2\); expected \(\1,\) or \(\1, 1\)"),
    Case("images/labels-count-differs", "images",
         _npz_with(train_labels=lambda a: a["train_labels"][:-1]),
         r"train_labels has shape \(\d+, 1\); expected \(\d+,\) or \(\d+, 1\)"),
    Case("images/zero-training-examples", "images",
         _npz_with(train_images=np.zeros((0, 28, 28), np.uint8),
                   train_labels=np.zeros((0, 1), np.uint8)),
         r"site h1: .*scans\.npz has zero training examples"),
    Case("images/site-folder-missing", "images", lambda s: s / "nowhere",
         r"does not exist or is not a directory", load_bad=True),
    # images: train|test/<class>/*.png
    Case("images/folder-train-is-a-file", "images",
         lambda s: _file_instead_of_folder(_image_folder(s) / "train"),
         r"train: a file; expected a folder train/<class>/\*\.png\|jpg", generate=False,
         load_cfg={"format": "folder"}),
    Case("images/folder-png-is-garbage", "images",
         lambda s: _write(_png(_image_folder(s)), _garbage_bytes()),
         r"1\.png: not a readable image", generate=False),
    Case("images/folder-png-cut-in-half", "images", lambda s: _cut_in_half(_png(_image_folder(s))),
         r"1\.png: not a readable image \(.*truncated", generate=False),
    Case("images/folder-image-outside-class-folders", "images", _loose_image,
         r"train: images \['loose\.png'\] are not inside a class folder", generate=False),
    Case("images/folder-mixed-image-sizes", "images", _one_image_32x32,
         r"train: images have different sizes", generate=False),
    Case("images/folder-undeclared-class", "images", _undeclared_class_folder,
         r"class 'nodule' is not one of the declared classes \['normal', 'opacity'\]",
         generate=False, load_cfg={"class_names": ["normal", "opacity"]}),
    # vitals: PhysioNet 2012 layout
    Case("vitals/outcomes-cut-mid-line", "vitals", lambda s: _cut_mid_line(_outcomes(s)),
         r"Outcomes-a\.txt:\d+: expected 6 fields \(RecordID,SAPS-I,.*\), got 2"),
    Case("vitals/outcomes-binary-garbage", "vitals", lambda s: _garbage_at_line_3(_outcomes(s)),
         r"Outcomes-a\.txt, line 3: not UTF-8 text \(byte 0x[0-9a-f]{2}: .*\); expected a CSV "
         r"file with columns RecordID,In-hospital_death encoded as UTF-8"),
    Case("vitals/outcomes-latin1", "vitals", lambda s: _latin1_at_line_4(_outcomes(s)),
         r"Outcomes-a\.txt, line 4: not UTF-8 text \(byte 0xe9"),
    Case("vitals/outcomes-utf16", "vitals", lambda s: _utf16(bom=True)(_outcomes(s)),
         r"Outcomes-a\.txt: UTF-16 text \(byte-order mark\); expected a CSV file"),
    Case("vitals/outcomes-empty-file", "vitals", lambda s: _empty(_outcomes(s)),
         r"Outcomes-a\.txt:1: header \[\] lacks \['RecordID', 'In-hospital_death'\]"),
    Case("vitals/outcomes-is-a-directory", "vitals", lambda s: _directory(_outcomes(s)),
         r"Outcomes-a\.txt: a directory; expected a CSV file with columns "
         r"RecordID,In-hospital_death"),
    Case("vitals/outcomes-missing", "vitals", lambda s: _outcomes(s).unlink() or _outcomes(s),
         r"Outcomes-a\.txt: missing; expected a CSV file with columns RecordID"),
    Case("vitals/outcomes-label-out-of-range", "vitals",
         lambda s: _edit_field(_outcomes(s), 2, 5, "2"),
         r"Outcomes-a\.txt:2: In-hospital_death='2' for stay \d+; expected an integer 0\.\.1"),
    Case("vitals/outcomes-label-nan", "vitals", lambda s: _edit_field(_outcomes(s), 2, 5, "NaN"),
         r"Outcomes-a\.txt:2: In-hospital_death='NaN' .*expected an integer 0\.\.1"),
    Case("vitals/outcomes-stay-listed-twice", "vitals",
         lambda s: _append_line(_outcomes(s), _outcomes(s).read_text().split("\n")[1]),
         r"Outcomes-a\.txt:\d+: stay \d+ is listed twice \(first on line 2\)"),
    Case("vitals/record-cut-mid-line", "vitals", lambda s: _cut_mid_line(_record(s)),
         r"\d+\.txt:\d+: expected 'HH:MM,Parameter,Value' with a numeric value"),
    Case("vitals/record-binary-garbage", "vitals", lambda s: _garbage_at_line_3(_record(s)),
         r"\d+\.txt, line 3: not UTF-8 text .*expected a PhysioNet 2012 record"),
    Case("vitals/record-utf16-without-bom", "vitals", lambda s: _utf16(bom=False)(_record(s)),
         r"\d+\.txt, line 1: a NUL byte; expected a PhysioNet 2012 record .*UTF-16"),
    Case("vitals/record-empty-file", "vitals", lambda s: _empty(_record(s)),
         r"\d+\.txt:1: expected the header 'Time,Parameter,Value', got '\(empty file\)'"),
    Case("vitals/record-is-a-directory", "vitals", lambda s: _directory(_record(s)),
         r"\d+\.txt: a directory; expected a PhysioNet 2012 record"),
    Case("vitals/record-bad-timestamp", "vitals", lambda s: _append_line(_record(s), "7h30,HR,80"),
         r"\d+\.txt:\d+: expected 'HH:MM,Parameter,Value' .*got '7h30,HR,80'"),
    Case("vitals/records-folder-is-a-file", "vitals",
         lambda s: _file_instead_of_folder(s / "set-a"),
         r"set-a: a file; expected a folder of <RecordID>\.txt files"),
    Case("vitals/site-folder-is-a-file", "vitals", lambda s: _file_instead_of_folder(s),
         r"site folder .* does not exist or is not a directory"),
    Case("vitals/zero-training-stays", "vitals", lambda s: s,
         r"site h1: .* has zero training stays", load_cfg={"test_fraction": 0.99999}),
    Case("vitals/spec-disagrees-with-variables", "vitals", lambda s: s,
         r"task\.spec\.num_variables=16 but task\.variables lists 3 variables; they must agree",
         load_cfg={"variables": ["HR", "pH", "GCS"]}, names_file=False),
    # vitals: long CSV
    Case("vitals/events-infinite-time", "vitals",
         lambda s: _long_csv_site(s, "7,1.0,HR,80\n8,inf,HR,90\n"),
         r"events\.csv:3: expected stay_id, numeric time_hours", generate=False),
    Case("vitals/events-unclosed-quote", "vitals",
         lambda s: _long_csv_site(s, '7,1.0,HR,80\n8,"2.0,HR,90\n'),
         r"events\.csv:\d+: (malformed CSV|expected 4 fields)", generate=False),
    # notes
    Case("notes/csv-cut-mid-line", "notes", lambda s: _cut_mid_line(s / "notes.csv"),
         r"notes\.csv, line \d+: (malformed CSV \(unexpected end of data\)|\d+ fields, expected)"),
    Case("notes/csv-binary-garbage", "notes", lambda s: _garbage_at_line_3(s / "notes.csv"),
         r"notes\.csv, line 3: not UTF-8 text .*expected a notes file \(CSV or JSONL\)"),
    Case("notes/csv-latin1", "notes", lambda s: _latin1_at_line_4(s / "notes.csv"),
         r"notes\.csv, line 4: not UTF-8 text \(byte 0xe9"),
    Case("notes/csv-utf16-without-bom", "notes", lambda s: _utf16(bom=False)(s / "notes.csv"),
         r"notes\.csv, line 1: a NUL byte; expected a notes file"),
    Case("notes/csv-empty-file", "notes", lambda s: _empty(s / "notes.csv"),
         r"notes\.csv: empty; expected a header row naming the columns"),
    Case("notes/csv-is-a-directory", "notes", lambda s: _directory(s / "notes.csv"),
         r"notes\.csv: a directory; expected a notes file \(CSV or JSONL, task\.file\)"),
    Case("notes/site-folder-missing", "notes", lambda s: s / "nowhere",
         r"does not exist or is not a directory", load_bad=True),
    Case("notes/text-column-missing", "notes",
         lambda s: _notes_csv(s, [("1", "cough", "0", "train")],
                              header=("note_id", "note", "label", "split")),
         r"notes\.csv: no text column 'text' \(task\.text_column\); found columns", generate=False),
    Case("notes/label-out-of-range", "notes",
         lambda s: _notes_csv(s, [("1", "cough", "0", "train"), ("2", "fever", "7", "train")]),
         r"notes\.csv, line 3: label '7' is not a declared class; expected one of "
         r"\['no_pneumonia', 'pneumonia'\]", generate=False),
    Case("notes/jsonl-cut-mid-line", "notes", lambda s: _cut_mid_line(s / "notes.jsonl"),
         r"notes\.jsonl, line \d+: malformed JSON \(.*\); expected one JSON object per line",
         cfg={"file": "notes.jsonl"}),
    Case("notes/jsonl-label-nan", "notes",
         lambda s: _write(s / "notes.jsonl", '{"text": "cough", "label": NaN}\n'),
         r"notes\.jsonl, line 1: label nan is not a declared class", cfg={"file": "notes.jsonl"},
         generate=False),
    Case("notes/jsonl-line-not-an-object", "notes",
         lambda s: _write(s / "notes.jsonl", '{"text": "ok", "label": 0}\n["cough", 1]\n'),
         r"notes\.jsonl, line 2: a JSON list; expected one JSON object per line",
         cfg={"file": "notes.jsonl"}, generate=False),
    Case("notes/zero-training-examples", "notes",
         lambda s: _notes_csv(s, [("1", "cough", "1", "test")]),
         r"site h1: .*notes\.csv has zero training examples", generate=False),
    # tabular (UCI heart disease layout: no header, '?' for missing)
    Case("tabular/csv-cut-mid-line", "tabular", lambda s: _cut_mid_line(_table(s)),
         r"\.data, line \d+: \d fields, expected 14 \(age, sex, .*\) as declared in "
         r"task\.columns"),
    Case("tabular/csv-binary-garbage", "tabular", lambda s: _garbage_at_line_3(_table(s)),
         r"\.data, line 3: not UTF-8 text .*expected a CSV table"),
    Case("tabular/csv-latin1", "tabular", lambda s: _latin1_at_line_4(_table(s)),
         r"\.data, line 4: not UTF-8 text \(byte 0xe9"),
    Case("tabular/csv-utf16", "tabular", lambda s: _utf16(bom=True)(_table(s)),
         r"\.data: UTF-16 text \(byte-order mark\); expected a CSV table"),
    Case("tabular/csv-empty-file", "tabular", lambda s: _empty(_table(s)),
         r"\.data: empty file; expected a CSV table"),
    Case("tabular/csv-is-a-directory", "tabular", lambda s: _directory(_table(s)) and s,
         r"expected train\.csv \+ test\.csv, or exactly one file matching 'processed\.\*\.data' "
         r"\(task\.file\); found none \(directories \['processed\.site\.data'\] match"),
    Case("tabular/value-infinite", "tabular", lambda s: _edit_field(_table(s), 1, 0, "inf"),
         r"\.data, line 1, column 'age': 'inf' is not a finite number"),
    Case("tabular/label-nan", "tabular", lambda s: _edit_field(_table(s), 1, 13, "NaN"),
         r"\.data, line 1: the label 'num' is missing; every record needs one"),
    Case("tabular/label-infinite", "tabular", lambda s: _edit_field(_table(s), 1, 13, "-inf"),
         r"\.data, line 1: label 'num' = '-inf' is not a number"),
    Case("tabular/label-out-of-declared-classes", "tabular",
         lambda s: _edit_field(_table(s), 1, 13, "7"),
         r"\.data, line 1: label 'num' = '7' is outside the declared classes \[0, 1\] "
         r"\(task\.label_classes\)",
         load_cfg={"label_threshold": None, "label_classes": [0, 1]}),
    Case("tabular/undeclared-category-code", "tabular", lambda s: _edit_field(_table(s), 1, 2, "9"),
         r"\.data, line 1, column 'cp': '9' is not one of the declared codes \[1, 2, 3, 4\]"),
    Case("tabular/header-lacks-columns", "tabular",
         lambda s: s.mkdir() or _write(s / "site.csv", "age,sex,num\n50,1,0\n"),
         r"site\.csv: columns \['trestbps', 'chol', .*\] are missing; found \['age', 'sex', "
         r"'num'\]", generate=False, load_cfg={"header": "first_line", "file": "*.csv"}),
    Case("tabular/site-folder-missing", "tabular", lambda s: s / "nowhere",
         r"does not exist or is not a directory", load_bad=True),
    Case("tabular/zero-training-records", "tabular", lambda s: _table(s),
         r"site h1: .*\.data has zero training records", load_cfg={"test_fraction": 0.999999}),
]


@pytest.mark.parametrize("case", LOADER_CASES, ids=[c.id for c in LOADER_CASES])
def test_a_broken_site_file_is_an_error_naming_the_file_and_what_was_expected(
        case: Case, task_cfgs, tmp_path):
    site = tmp_path / "site"
    task_cfg = {**task_cfgs[case.task], **case.cfg}
    if case.generate:
        _generate(case.task, task_cfg, site)
    bad = case.corrupt(site)
    with pytest.raises(DataError) as err:  # anything else (a raw traceback) fails the test
        get_task(case.task).load_site(bad if case.load_bad else site,
                                      {**task_cfg, **case.load_cfg}, "h1")
    message = str(err.value)
    if case.names_file:
        assert str(bad) in message, f"the message does not name {bad}: {message}"
    assert re.search(case.expect, message), f"expected /{case.expect}/ in: {message}"
    assert "\n" not in message  # one line, as the CLI prints it


# --------------------------------------------------------------------------- left out, and counted


def _finite(data) -> bool:
    return all(torch.isfinite(t.float()).all() for part in (data.train, data.test)
               for t in part.tensors)


@dataclass(frozen=True)
class Counted:
    """A bad value a loader leaves out on purpose: the site loads, the value is counted in
    ``SiteData.skipped[key]``, and no NaN/Inf reaches a tensor."""

    id: str
    task: str
    corrupt: Callable[[Path], Path]
    key: str
    extra: int  # how many more the count must be than on the intact site
    load_cfg: dict[str, Any] = field(default_factory=dict)


COUNTED_CASES = [
    Counted("vitals/measurements-nan-inf-1e400", "vitals",
            lambda s: _append_line(_append_line(_append_line(
                _record(s), "01:00,HR,inf"), "02:00,HR,1e400"), "03:00,Pressor,-inf"),
            "implausible_value_observations", 3,
            # a variable without physiological limits: inf must not pass for want of a range
            load_cfg={"variables": ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2",
                                    "GCS", "Lactate", "Creatinine", "BUN", "WBC", "Glucose",
                                    "pH", "Platelets", "HCO3", "Pressor"],
                      "spec": {"num_variables": 17, "num_static": 12, "num_classes": 2}}),
    Counted("vitals/measurement-nan", "vitals", lambda s: _append_line(_record(s), "01:00,HR,nan"),
            "missing_value_observations", 1),
    Counted("vitals/icutype-inf", "vitals",
            lambda s: _record(s).write_text(re.sub(r"00:00,ICUType,\d", "00:00,ICUType,inf",
                                                   _record(s).read_text())) and _record(s),
            "implausible_static_values", 1),
    Counted("vitals/icutype-not-a-unit", "vitals",
            lambda s: _record(s).write_text(re.sub(r"00:00,ICUType,\d", "00:00,ICUType,9",
                                                   _record(s).read_text())) and _record(s),
            "implausible_static_values", 1),
    Counted("notes/empty-text", "notes",
            lambda s: _append_line(s / "notes.csv", '99-1,1,2131-01-01,x,"",pneumonia,train'),
            "empty text", 1),
]


@pytest.mark.parametrize("case", COUNTED_CASES, ids=[c.id for c in COUNTED_CASES])
def test_a_value_left_out_on_purpose_is_counted_and_never_reaches_a_tensor(
        case: Counted, task_cfgs, tmp_path):
    load_cfg = {**task_cfgs[case.task], **case.load_cfg}
    task = get_task(case.task)
    site = _generate(case.task, task_cfgs[case.task], tmp_path / "site")
    before = task.load_site(site, load_cfg, "h1")
    case.corrupt(site)
    after = task.load_site(site, load_cfg, "h1")
    assert after.skipped.get(case.key, 0) == before.skipped.get(case.key, 0) + case.extra
    assert len(after.train) + len(after.test) == len(before.train) + len(before.test)
    assert _finite(after)


def test_nan_in_a_tabular_numeric_column_is_a_missing_value_with_its_indicator(task_cfgs, tmp_path):
    """``NaN`` is one of ``task.missing_values``: imputed and flagged, not a NaN feature."""
    cfg = task_cfgs["tabular"]
    site = _generate("tabular", cfg, tmp_path / "site")
    _edit_field(_table(site), 1, 0, "NaN")  # age of the first record
    data = get_task("tabular").load_site(site, cfg, "h1")
    assert _finite(data)
    features = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    assert features[:, 1].sum() >= 1  # age_missing is set for that record


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class Entry:
    """A bad ``data.*`` setting, seen through ``site_folders`` (what ``simulations.run`` calls
    first, before any model or Ray exists)."""

    id: str
    overrides: Callable[[Path], list[str]]
    expect: str


@functools.cache
def _pooled_npz_bytes() -> bytes:
    """A valid pooled MedMNIST-style file (generated once, copied into each test)."""
    cfg = compose(["task.synthetic.train_size=16", "task.synthetic.test_size=8"])["task"]
    with tempfile.TemporaryDirectory() as tmp:
        return _npz(_generate("images", cfg, Path(tmp) / "pooled")).read_bytes()


def _pooled_npz(tmp: Path, **changes: Any) -> Path:
    _write(_npz(tmp / "pooled"), _pooled_npz_bytes())
    if changes:
        _npz_with(**changes)(tmp / "pooled")
    return _npz(tmp / "pooled")


@pytest.fixture(scope="module")
def run_cfg() -> dict[str, Any]:
    return compose([])


def _with_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides as Hydra types them (YAML scalars), without composing again."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = yaml.safe_load(value)
    return cfg


def _root_with_files_only(tmp: Path) -> Path:
    (tmp / "root").mkdir()
    (tmp / "root" / "scans.npz").write_bytes(b"")
    return tmp / "root"


ENTRY_CASES = [
    Entry("data.root/missing", lambda t: [f"data.root={t / 'nowhere'}"],
          r"data\.root=.*nowhere is not a directory \(it does not exist\); expected a folder "
          r"with one sub-folder per hospital"),
    Entry("data.root/is-a-file", lambda t: [f"data.root={_pooled_npz(t)}"],
          r"data\.root=.*scans\.npz is not a directory \(a file\)"),
    Entry("data.root/no-site-folders", lambda t: [f"data.root={_root_with_files_only(t)}"],
          r"data\.root=.*root has no sub-folders; expected one per hospital \(found only files: "
          r"\['scans\.npz'\]; for one pooled dataset use data\.path\)"),
    Entry("data.root/and-data.path", lambda t: [f"data.root={t}", f"data.path={t}"],
          r"give either data\.root .* or data\.path .*, not both"),
    Entry("data.path/missing", lambda t: [f"data.path={t / 'pooled.npz'}"],
          r"data\.path=.*pooled\.npz does not exist; expected the pooled dataset to split into "
          r"hospitals \(a file or folder in the images task's format\)"),
    Entry("data.path/npz-cut-in-half", lambda t: [f"data.path={_cut_in_half(_pooled_npz(t))}"],
          r"scans\.npz: not a readable \.npz file"),
    Entry("data.path/label-out-of-range",
          lambda t: [f"data.path={_pooled_npz(t, test_labels=lambda a: a['test_labels'] + 4)}"],
          r"scans\.npz: test_labels\[0\] = [4-9] is outside the declared classes 0\.\.1"),
    Entry("data.partition/unknown", lambda t: ["data.partition=foo"],
          r"data\.partition must be one of \['iid', 'dirichlet', 'quantity', 'column'\], "
          r"got 'foo'"),
    Entry("data.alpha/zero", lambda t: ["data.partition=dirichlet", "data.alpha=0",
                                        f"data.path={_pooled_npz(t)}"],
          r"data\.alpha must be a number > 0 \(Dirichlet concentration\), got 0"),
    Entry("data.site_column/missing", lambda t: ["data.partition=column",
                                                 f"data.path={_pooled_npz(t)}"],
          r"data\.partition=column needs data\.site_column"),
    Entry("data.partition/column-on-images", lambda t: [
        "data.partition=column", "data.site_column=hospital", f"data.path={_pooled_npz(t)}"],
          r"scans\.npz: images have no columns; data\.partition=column needs a tabular or notes"),
    Entry("data.path/more-hospitals-than-records", lambda t: [
        "num_hospitals=40", "data.partition=dirichlet", "data.alpha=0.05",
        f"data.path={_pooled_npz(t)}"],
          r"data\.partition=dirichlet left site hospital_\d+ with zero training records from "
          r".*scans\.npz; use fewer hospitals or a larger data\.alpha"),
]


@pytest.mark.parametrize("case", ENTRY_CASES, ids=[c.id for c in ENTRY_CASES])
def test_a_bad_data_setting_is_an_error_naming_the_key_before_anything_starts(
        case: Entry, run_cfg, tmp_path):
    cfg = _with_overrides(run_cfg, [f"data.cache_dir={tmp_path / 'cache'}",
                                    *case.overrides(tmp_path)])
    with pytest.raises(DataError) as err:
        site_folders(cfg)
    assert re.search(case.expect, str(err.value)), f"expected /{case.expect}/ in: {err.value}"
    # a failed split leaves no half-written partition in the cache for the next run to reuse
    partitions = tmp_path / "cache" / "partitions"
    assert not partitions.exists() or not [p for p in partitions.iterdir()
                                           if not p.name.startswith(".")]


def test_unknown_config_values_name_the_key_in_process():
    with pytest.raises(MissingConfigException, match=r"Could not find 'task/nope'") as err:
        compose(["task=nope"])
    assert all(t in str(err.value) for t in TASKS)  # the valid choices are listed
    # privacy.* keys other than name exist only with privacy=dp
    with pytest.raises(ConfigCompositionException, match=r"privacy\.accountant"):
        compose(["privacy.accountant=xyz"])


# --------------------------------------------------------------------------- the CLI


def _site_root_with_cut_npz(tmp: Path) -> Path:
    cfg = compose(["task.synthetic.train_size=12", "task.synthetic.test_size=6"])["task"]
    for name in ("general", "st_marys"):
        _generate("images", cfg, tmp / "root" / name)
    _cut_in_half(tmp / "root" / "st_marys" / "scans.npz")
    return tmp / "root"


# (id, overrides from tmp_path, what stderr must say)
CLI_CASES: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    ("cli/task=nope", lambda t: ["task=nope"],
     ["error: unknown task 'nope'; did you mean 'notes'? (task is one of: images, notes, "
      "tabular, vitals)"]),
    ("cli/privacy.accountant=xyz", lambda t: ["privacy=dp", "privacy.accountant=xyz"],
     ["error: privacy.accountant must be one of ['prv', 'rdp'], got 'xyz'"]),
    ("cli/data.partition=foo", lambda t: ["data.partition=foo"],
     ["error: data.partition must be one of ['iid', 'dirichlet', 'quantity', 'column'], "
      "got 'foo'"]),
    ("cli/data.root-site-npz-cut-in-half", lambda t: [f"data.root={_site_root_with_cut_npz(t)}"],
     ["error: {tmp}/root/st_marys/scans.npz: not a readable .npz file (BadZipFile"]),
]


@pytest.mark.slow
def test_the_cli_exits_2_naming_the_key_or_file_before_the_simulation_starts(tmp_path):
    """``python -m simulations.run``: config and data errors are raised before Ray starts (no
    progress bar, no report) and exit with code 2 and a one-line message, never a traceback.
    The processes run side by side: each start (imports) costs several seconds."""
    started = time.perf_counter()
    runs = []
    for i, (case_id, overrides, _) in enumerate(CLI_CASES):
        tmp = tmp_path / f"case{i}"
        tmp.mkdir()
        argv = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={tmp / 'run'}",
                f"data.cache_dir={tmp / 'cache'}", *overrides(tmp)]
        runs.append((case_id, tmp, subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for (case_id, tmp, proc), (_, _, expected) in zip(runs, CLI_CASES, strict=True):
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2, f"{case_id}: exit {proc.returncode}\n{stderr[-3000:]}"
        for text in expected:
            assert text.format(tmp=tmp) in stderr, f"{case_id}: {text!r} not in\n{stderr}"
        assert "Traceback" not in stderr, f"{case_id}: raw traceback\n{stderr}"
        assert "federated rounds" not in stderr  # the simulation (Ray) never started
        assert not (tmp / "run" / "report.json").exists()
    assert time.perf_counter() - started < 120  # no Ray cluster, no training


# --------------------------------------------------------------------------- the docs table


def test_the_docs_table_lists_every_case():
    """docs/bad_inputs.md has one row per case of this file (kept in sync by hand)."""
    ids = ([c.id for c in LOADER_CASES] + [c.id for c in COUNTED_CASES]
           + [c.id for c in ENTRY_CASES] + [c[0] for c in CLI_CASES]
           + ["tabular/value-nan-is-missing", "config/task=nope", "config/privacy.accountant"])
    assert len(ids) == len(set(ids))
    rows = re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(rows) == sorted(ids)

