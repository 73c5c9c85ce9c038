"""Notes task: CSV and JSONL notes files, hashed tokens, the synthetic generator, the encoder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.evaluation import evaluate
from client.tasks import DataError, get_task
from client.tasks.notes import encode_note, encode_notes, note_words
from client.training import LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

TASK = get_task("notes")
GENERATOR = get_generator("notes")  # synthetic sites and partitions (simulation only)
# A small encoder keeps the learning tests fast; the configured one is checked for DP below
# (the default notes model, bow, in tests/test_bow.py).
SMALL_MODEL = {"name": "attention", "d_model": 32, "num_heads": 2, "num_layers": 1,
               "ff_dim": 64, "dropout": 0.1}


@pytest.fixture
def cfg():
    return compose(["task=notes", "task.synthetic.train_size=60", "task.synthetic.test_size=30"])


def _write_csv(path, rows, header=("note_id", "text", "label", "split")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_jsonl(path, objects):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objects) + "\n")


def test_tokens_are_hashed_words_and_bigrams_fixed_by_config_not_by_data():
    assert note_words("Pt w/ RLL PNA, r/o CHF; Lungenentzündung 38.5") == [
        "pt", "w", "rll", "pna", "r", "o", "chf", "lungenentzündung", "38", "5"]
    ids = encode_note("No evidence of pneumonia", vocab_buckets=8192, max_len=8)
    # crc32 ids pinned: the same word gets the same id at every site, in every process/version
    assert ids.tolist() == [[7918, 4554], [7877, 2189], [7117, 4874], [4116, 0]]
    assert encode_note("NO  evidence, of PNEUMONIA!", 8192, 8).tolist() == ids.tolist()
    tokens, mask = encode_notes(["a b c d e f", "", "word"], vocab_buckets=64, max_len=4)
    assert tokens.shape == (3, 4, 2) and tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 4, [False] * 4, [True, False, False, False]]
    assert tokens[0, 3, 1] != 0  # the bigram "d e" reaches past the truncation point
    assert int(tokens.max()) < 64 and int(tokens[mask][:, 0].min()) >= 1


def test_csv_round_trip_with_messy_rows(tmp_path, cfg):
    multiline = 'HOSPITAL COURSE: CXR showed RLL consolidation,\n"PNA" treated w/ abx.'
    rows = [
        ("n1", multiline, "pneumonia", "train"),
        ("n2", "No evidence of pneumonia, CHF exacerbation.", "0", "TRAIN"),
        ("n3", "", "pneumonia", "train"),  # empty note: skipped and counted
        ("n4", "Cellulitis of the left leg.", " no_pneumonia ", "val"),  # val counts as train
        ("n5", "Unlabelled note.", "", "train"),  # no label: skipped and counted
        ("n6", "...", "1", "train"),  # no words at all
        ("n7", "Admitted with pneumonia.", "Pneumonia", "test"),
    ]
    path = tmp_path / "site" / "notes.csv"
    _write_csv(path, rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b"\r\n")  # Excel BOM, trailing blank
    data = TASK.load_site(tmp_path / "site", cfg["task"], "h1")
    tokens, mask, labels = data.train.tensors
    assert labels.tolist() == [1, 0, 0] and data.test.tensors[-1].tolist() == [1]
    assert tokens.shape == (3, 128, 2) and mask.shape == (3, 128)
    assert mask[0].sum() == len(note_words(multiline))
    assert data.skipped == {"empty text": 1, "missing label": 1, "no words in text": 1}
    assert data.source == str(path) and data.num_classes == 2


def test_jsonl_with_integer_labels_and_hashed_split(tmp_path, cfg):
    task_cfg = {**cfg["task"], "file": "notes.jsonl", "class_names": None}
    notes = [{"note_id": f"id{i}", "text": f"note number {i}", "label": i % 2} for i in range(60)]
    notes[5]["text"] = None
    _write_jsonl(tmp_path / "a" / "notes.jsonl", notes)
    _write_jsonl(tmp_path / "b" / "notes.jsonl", notes[::-1])  # same notes, other order
    a = TASK.load_site(tmp_path / "a", task_cfg, "a")
    b = TASK.load_site(tmp_path / "b", task_cfg, "b")
    assert a.skipped == {"empty text": 1} and len(a.train) + len(a.test) == 59
    assert 3 <= len(a.test) <= 25  # test_fraction 0.2 of 59, by hash
    # membership follows the note id, not the row order
    numbers = [sorted(d.test.tensors[0][:, 2, 0].tolist()) for d in (a, b)]  # "note number i"
    assert numbers[0] == numbers[1] and len(set(numbers[0])) == len(a.test)


def test_auto_format_finds_the_jsonl_file_of_a_site(tmp_path, cfg):
    _write_jsonl(tmp_path / "notes.jsonl", [{"text": "pneumonia", "label": "pneumonia",
                                             "split": "train"}])
    data = TASK.load_site(tmp_path, cfg["task"], "h1")  # task.file is notes.csv
    assert data.source.endswith("notes.jsonl") and len(data.train) == 1


@pytest.mark.parametrize("write, message", [
    (lambda p: _write_csv(p / "notes.csv", [("1", "x", "0")], header=("id", "note", "label")),
     r"notes.csv: no text column 'text' \(task.text_column\); found columns \['id', 'note'"),
    (lambda p: _write_csv(p / "notes.csv", [("1", "ok", "0", "train"), ("2", "x", "sepsis", "")]),
     r"notes.csv, line 3: label 'sepsis' is not a declared class; expected one of "
     r"\['no_pneumonia', 'pneumonia'\]"),
    (lambda p: _write_csv(p / "notes.csv", [("1", "ok", "0", "train"), ("2", "x", "0", "later")]),
     r"notes.csv, line 3: 'split' is 'later'; expected train or test"),
    (lambda p: (p / "notes.csv").write_text('note_id,text,label\n1,"fine",0\n2,"a,b",1,extra\n'),
     r"notes.csv, line 3: 4 fields, expected 3"),
    (lambda p: _write_jsonl(p / "notes.jsonl", [{"text": "ok", "label": 0}, '{"text": "x", ']),
     r"notes.jsonl, line 2: malformed JSON"),
    (lambda p: _write_jsonl(p / "notes.jsonl", [{"text": "ok", "label": 7}]),
     r"notes.jsonl, line 1: label 7 is not a declared class"),
    (lambda p: (p / "notes.csv").write_bytes(b"text,label\nok,0\n\xff\xfe,1\n"),
     r"notes.csv, line 3: not UTF-8"),
    (lambda p: _write_csv(p / "notes.csv", [("1", "only a test note", "1", "test")]),
     r"site h1: .*notes.csv has zero training examples"),
    (lambda p: p.mkdir(exist_ok=True), r"notes.csv: missing; expected a notes file"),
])
def test_bad_input_names_the_file_line_and_what_was_expected(tmp_path, cfg, write, message):
    write(tmp_path)
    with pytest.raises(DataError, match=message):
        TASK.load_site(tmp_path, cfg["task"], "h1")


def test_synthetic_sites_are_deterministic_in_the_real_format_and_differ_in_style(tmp_path, cfg):
    task_cfg = cfg["task"]
    profiles = GENERATOR.site_profiles(task_cfg, 3, seed=0)
    for profile in profiles:
        GENERATOR.generate_site(tmp_path / f"s{profile.index}", task_cfg, profile, seed=0)
    GENERATOR.generate_site(tmp_path / "again", task_cfg, profiles[0], seed=0)
    assert (tmp_path / "s0/notes.csv").read_bytes() == (tmp_path / "again/notes.csv").read_bytes()
    with (tmp_path / "s0/notes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"note_id", "text", "label", "split"} <= set(rows[0])
    assert {r["label"] for r in rows} == {"no_pneumonia", "pneumonia"}
    assert sum(r["split"] == "test" for r in rows) == profiles[0].num_test
    sites = [TASK.load_site(tmp_path / f"s{i}", task_cfg, f"s{i}") for i in range(3)]
    for site, profile in zip(sites, profiles):
        kept = len(site.train) + len(site.test) + sum(site.skipped.values())
        assert kept == profile.num_train + profile.num_test
    # writing style is the shift: the most abbreviating site writes "PNA"/"CHF" far more often
    def abbreviation_rate(i):
        text = (tmp_path / f"s{i}/notes.csv").read_text().lower()
        short = sum(text.count(f" {w} ") for w in ("pna", "chf", "sob", "cxr"))
        long = sum(text.count(w) for w in ("pneumonia", "heart failure", "shortness of breath",
                                           "chest x-ray"))
        return short / (short + long)
    rates = {p.shift["u"]: abbreviation_rate(p.index) for p in profiles}
    assert rates[max(rates)] > rates[min(rates)] + 0.1, rates


def test_pooled_file_partitions_keep_train_test_membership(tmp_path, cfg):
    task_cfg = cfg["task"]
    rows = [(f"n{i}", f"note {i} mentions pneumonia" if i % 3 else "", str(i % 2), "",
             f"hosp{i % 2}") for i in range(40)]
    rows[7] = ("n7", "unlabelled", "", "", "hosp1")
    pooled = tmp_path / "pooled.csv"
    _write_csv(pooled, rows, header=("note_id", "text", "label", "split", "hospital"))
    records = GENERATOR.index_pooled(pooled, task_cfg, site_column="hospital")
    assert len(records) == 39 and set(records.groups) == {"hosp0", "hosp1"}
    with pytest.raises(DataError, match="no site column 'ward'"):
        GENERATOR.index_pooled(pooled, task_cfg, site_column="ward")
    picked = np.flatnonzero(records.groups == "hosp0")
    GENERATOR.write_partition(pooled, {**task_cfg, "file": "notes.jsonl"}, tmp_path / "site",
                         picked)
    site = TASK.load_site(tmp_path / "site", {**task_cfg, "file": "notes.jsonl"}, "hosp0")
    written = [json.loads(line) for line in
               (tmp_path / "site/notes.jsonl").read_text().splitlines()]
    assert [w["note_id"] for w in written] == [f"n{i}" for i in range(0, 40, 2)]
    assert [w["split"] == "test" for w in written] == records.is_test[picked].tolist()
    assert len(site.test) == sum(w["split"] == "test" and w["text"] != "" for w in written)
    assert site.skipped == {"empty text": sum(w["text"] == "" for w in written)}


NOTE_MODELS = [  # (model config, tolerance of "alone vs in a padded batch")
    ({**SMALL_MODEL, "num_layers": 2}, 1e-5),
    ({"name": "bow", "pooling": "sqrt", "embedding_std": 1.0}, 1e-6),
    ({"name": "bow", "pooling": "mean", "embedding_std": 1.0}, 1e-6),
]


@pytest.mark.parametrize("model_cfg, alone_atol", NOTE_MODELS,
                         ids=["attention", "bow-sqrt", "bow-mean"])
def test_padding_never_changes_the_output(model_cfg, alone_atol):
    torch.manual_seed(0)
    model = build_model(model_cfg, {"vocab_buckets": 512, "max_len": 16,
                                    "num_classes": 3}).eval()
    tokens = torch.randint(1, 512, (4, 16, 2))
    tokens[:, :, 1][torch.rand(4, 16) < 0.3] = 0  # words that start no bigram
    mask = torch.zeros(4, 16, dtype=torch.bool)
    for i, n in enumerate((16, 9, 3, 1)):
        mask[i, :n] = True
    other = tokens.clone()
    other[~mask] = torch.randint(0, 512, (int((~mask).sum()), 2))
    assert not torch.equal(other, tokens)
    assert torch.allclose(model(tokens, mask), model(other, mask), atol=1e-6)
    # a note's output does not depend on how much padding follows it, nor on its batch mates
    alone = model(tokens[2:3, :3], mask[2:3, :3])
    assert torch.allclose(model(tokens, mask)[2:3], alone, atol=alone_atol)
    assert torch.isfinite(model(tokens, torch.zeros_like(mask))).all()  # a note with no words


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_configured_encoder_passes_opacus_validation_and_a_dp_sgd_step(cfg, one_thread):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    model = build_model(compose(["task=notes", "model=attention"])["model"],
                        TASK.input_spec(cfg["task"]))
    assert ModuleValidator.validate(model, strict=True) == []
    tokens, mask = encode_notes(["no evidence of pneumonia", "rll pna on cxr", "chf"] * 6,
                                vocab_buckets=8192, max_len=128)
    loader = DataLoader(TensorDataset(tokens, mask, torch.arange(18) % 2), batch_size=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for x, m, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(private(x, m), y).backward()
        optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed)  # every parameter, the position table included, got a noisy update
    # Poisson sampling draws empty batches; the step must still run (and be noised)
    optimizer.zero_grad()
    private(tokens[:0], mask[:0]).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _fedavg(sites, model_cfg, spec, rounds, labels_of=lambda s: s.train.tensors[-1]):
    """Two rounds of plain FedAvg with the real local training loop (no Flower)."""
    torch.manual_seed(0)
    global_model = build_model(model_cfg, spec)
    for rnd in range(rounds):
        states, weights = [], []
        for i, site in enumerate(sites):
            local = build_model(model_cfg, spec)
            local.load_state_dict(global_model.state_dict())
            dataset = TensorDataset(*site.train.tensors[:-1], labels_of(site))
            train_local(local, dataset, LocalTrainingConfig(epochs=3, batch_size=32, lr=0.05,
                                                            momentum=0.9), seed=rnd * 10 + i)
            states.append(local.state_dict())
            weights.append(len(dataset))
        total = sum(weights)
        global_model.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) / total
                                      for k in states[0]})
    return global_model


@pytest.mark.slow
def test_three_hospitals_learn_in_two_rounds_and_shuffled_labels_do_not(tmp_path, cfg,
                                                                        one_thread):
    # generator v2 notes are harder (2 in 5 pneumonia notes never name it): 300 notes a site
    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 300,
                                             "test_size": 120}}
    spec = TASK.input_spec(task_cfg)
    sites = []
    for profile in GENERATOR.site_profiles(task_cfg, 3, seed=1):
        GENERATOR.generate_site(tmp_path / f"h{profile.index}", task_cfg, profile, seed=1)
        sites.append(TASK.load_site(tmp_path / f"h{profile.index}", task_cfg, "h"))
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name, labels_of in (("real", lambda s: s.train.tensors[-1]),
                            ("shuffled", lambda s: s.train.tensors[-1][
                                torch.randperm(len(s.train), generator=gen)])):
        model = _fedavg(sites, SMALL_MODEL, spec, rounds=2, labels_of=labels_of)
        # each site's own test split: a pooled AUROC would reward learning site prevalence
        results[name] = [evaluate(model, s.test, 2)["auroc"] for s in sites]
    assert np.mean(results["real"]) > 0.75 and min(results["real"]) > 0.7, results
    assert abs(np.mean(results["shuffled"]) - 0.5) < 0.12, results


def test_raw_notes_helper_and_tfidf_reference_use_the_loaders_split(tmp_path, cfg):
    from client.tasks.notes import read_site_notes
    from simulations.benchmarks.text_reference import tfidf_logreg_reference

    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 200,
                                             "test_size": 100}}
    folders = {}
    for profile in GENERATOR.site_profiles(task_cfg, 2, seed=3):
        folders[f"h{profile.index}"] = tmp_path / f"h{profile.index}"
        GENERATOR.generate_site(folders[f"h{profile.index}"], task_cfg, profile, seed=3)
    for site, folder in folders.items():
        notes, data = read_site_notes(folder, task_cfg, site), TASK.load_site(folder, task_cfg,
                                                                                site)
        assert notes.train_labels == data.train.tensors[-1].tolist()
        assert notes.test_labels == data.test.tensors[-1].tolist()
        assert notes.skipped == data.skipped and notes.source == data.source
        tokens, mask = encode_notes(notes.test_texts, 8192, 128)
        assert torch.equal(tokens, data.test.tensors[0]) and torch.equal(mask, data.test.tensors[1])
    metrics = tfidf_logreg_reference({"task": task_cfg}, folders)
    assert set(metrics) >= {"loss", "accuracy", "balanced_accuracy", "auroc", "macro_f1"}
    assert metrics["auroc"] > 0.75 and metrics["macro_f1"] > 0.65, metrics
