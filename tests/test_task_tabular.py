"""Tabular task: UCI heart-disease files and header CSVs, the synthetic generator, the MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from client.evaluation import evaluate
from client.tasks import DataError, get_task
from client.tasks.tabular import encoded_width, feature_names
from client.training import LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

TASK = get_task("tabular")
GENERATOR = get_generator("tabular")  # synthetic sites and partitions (simulation only)

# Rows as the real processed.<centre>.data files write them: cleveland uses "63.0", hungarian
# "63", "?" for missing, switzerland writes an unmeasured cholesterol as 0.
UCI_ROWS = [
    "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0",
    "67.0,1.0,4.0,160.0,286.0,0.0,2.0,108.0,1.0,1.5,2.0,3.0,3.0,2",
    "37,1,3,130,250,0,0,187,0,3.5,3,0,3,0",
    "41,0,2,130,0,0,2,172,0,1.4,1,?,?,1",
    "56,1,2,?,236,0,0,178,0,0.8,1,0,3,4",
    "57,0,4,120,354,0,0,163,1,0.6,1,0,3,0",
]


@pytest.fixture(scope="module")
def cfg():
    return compose(["task=tabular", "task.synthetic.train_size=60",
                    "task.synthetic.test_size=20"])


def _site(tmp_path, rows, name="processed.cleveland.data"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    return tmp_path


def _all_train(task_cfg):
    return {**task_cfg, "test_fraction": 0.0}


def test_the_encoded_width_follows_from_config_alone(cfg):
    task_cfg = cfg["task"]
    # 9 numeric columns x (value, missing) + cp 4+1, restecg 3+1, slope 3+1, thal 3+1
    assert encoded_width(task_cfg) == 35 == task_cfg["spec"]["num_features"]
    assert TASK.input_spec(task_cfg) == {"num_features": 35, "num_classes": 2}
    assert len(feature_names(task_cfg)) == 35
    # the server builds from config: the model accepts what a site loads
    model = build_model(cfg["model"], task_cfg["spec"])
    assert model(torch.zeros(3, 35)).shape == (3, 2)
    fewer = {**task_cfg, "numeric": ["age", "sex"]}
    with pytest.raises(DataError, match="set task.spec.num_features=21"):
        TASK.input_spec(fewer)
    assert TASK.input_spec({**fewer, "spec": {"num_classes": 2}})["num_features"] == 21


def test_uci_heart_disease_file_reads_with_missing_values_and_binarised_label(tmp_path, cfg):
    task_cfg = _all_train(cfg["task"])
    data = TASK.load_site(_site(tmp_path, UCI_ROWS), task_cfg, "cleveland")
    x, y = data.train.tensors
    assert x.shape == (6, 35) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 0, 1, 1, 0]  # num > 0
    assert len(data.test) == 0 and data.skipped == {} and data.source.endswith(".data")
    col = {name: i for i, name in enumerate(feature_names(task_cfg))}
    # numeric: standardised with this site's training mean/std; "63.0" and "63" read alike
    ages = np.array([63, 67, 37, 41, 56, 57], dtype=float)
    expected = (ages - ages.mean()) / ages.std()
    assert np.allclose(x[:, col["age"]].numpy(), expected, atol=1e-5)
    # chol 0 and trestbps "?" are missing: imputed with the mean (0 after scaling), flagged
    assert x[3, col["chol"]] == 0 and x[3, col["chol_missing"]] == 1
    assert x[4, col["trestbps"]] == 0 and x[4, col["trestbps_missing"]] == 1
    assert x[:, col["chol_missing"]].tolist() == [0, 0, 0, 1, 0, 0]
    # categorical: one-hot over the declared codes ("6.0" is code 6), missing has its own slot
    assert x[0, [col["thal=3"], col["thal=6"], col["thal=7"], col["thal_missing"]]].tolist() \
        == [0, 1, 0, 0]
    assert x[3, [col["thal=3"], col["thal=6"], col["thal=7"], col["thal_missing"]]].tolist() \
        == [0, 0, 0, 1]
    assert x[1, col["cp=4"]] == 1 and x[1, col["cp=1"]] == 0
    assert x[3, col["ca"]] == 0 and x[3, col["ca_missing"]] == 1


def test_standardize_auto_is_reference_under_dp_and_site_otherwise():
    dp = compose(["task=tabular", "privacy=dp"])["task"]
    off = compose(["task=tabular"])["task"]
    assert dp["standardize"] == "reference" and off["standardize"] == "site"


@pytest.mark.parametrize("column", ["chol", "age"])
def test_under_reference_one_patient_moves_no_other_patients_features(tmp_path, cfg, column):
    """DP-SGD bounds each record's influence through its own gradient only: with reference
    standardisation an extreme patient changes its own features and nobody else's; with the
    site's statistics it moves every other patient's standardised value."""
    index = cfg["task"]["columns"].index(column)
    extreme = [*UCI_ROWS[0].split(",")]
    extreme[index] = "560"
    changed = [",".join(extreme), *UCI_ROWS[1:]]
    col = feature_names(cfg["task"]).index(column)
    for mode, others_move in (("reference", False), ("site", True)):
        task_cfg = {**_all_train(cfg["task"]), "standardize": mode}
        before = TASK.load_site(_site(tmp_path / mode / "a", UCI_ROWS), task_cfg, "a")
        after = TASK.load_site(_site(tmp_path / mode / "b", changed), task_cfg, "b")
        x, x_changed = before.train.tensors[0], after.train.tensors[0]
        assert x_changed[0, col] != x[0, col]  # the patient's own value changes either way
        moved = (x_changed[1:] - x[1:]).abs().max().item()
        assert (moved > 0.1) == others_move, (mode, moved)
        if not others_move:
            assert torch.equal(x_changed[1:], x[1:])


def test_reference_standardisation_uses_the_configured_values_and_imputes_their_mean(
        tmp_path, cfg):
    task_cfg = {**_all_train(cfg["task"]), "standardize": "reference"}
    data = TASK.load_site(_site(tmp_path, UCI_ROWS), task_cfg, "cleveland")
    x = data.train.tensors[0]
    col = {name: i for i, name in enumerate(feature_names(task_cfg))}
    mean, sd = task_cfg["reference"]["chol"]
    assert x[0, col["chol"]].item() == pytest.approx((233 - mean) / sd, rel=1e-5)
    # chol 0 (missing): the reference mean, i.e. 0 after scaling, flagged
    assert x[3, col["chol"]] == 0 and x[3, col["chol_missing"]] == 1
    missing_reference = {**task_cfg, "reference": {
        k: v for k, v in task_cfg["reference"].items() if k != "oldpeak"}}
    with pytest.raises(DataError, match="task.reference.oldpeak"):
        TASK.load_site(tmp_path, missing_reference, "cleveland")
    with pytest.raises(DataError, match="unresolved"):
        TASK.load_site(tmp_path, {**task_cfg, "standardize": "auto"}, "cleveland")


def test_header_csv_with_train_and_test_files_and_declared_classes(tmp_path, cfg):
    task_cfg = {
        **cfg["task"], "header": "first_line", "file": "*.csv", "zero_as_missing": [],
        "numeric": ["age", "lactate"], "categorical": {"ward": ["icu", "med", "surg"]},
        "label": "outcome", "label_threshold": None, "label_classes": ["home", "rehab", "died"],
        "spec": {"num_features": 8, "num_classes": 3},
    }
    header = "patient_id,age,ward,lactate,outcome"
    train_rows = ["p1,70,icu,NaN,died", "p2,50,med,1.0,home", '"p3, jr",60,surg,3.0,rehab',
                  "p4,,icu,2.0,home"]
    (tmp_path / "train.csv").write_text("\n".join([header, *train_rows]) + "\n\n")
    (tmp_path / "test.csv").write_text(f"{header}\np9,1000,?,50.0,died")
    data = TASK.load_site(tmp_path, task_cfg, "h1")
    x, y = data.train.tensors
    assert y.tolist() == [2, 0, 1, 0] and data.test.tensors[1].tolist() == [2]
    assert x.shape == (4, 8)
    # statistics come from the training split only: the test row's extreme values change nothing
    assert np.allclose(x[:3, 0].numpy(), (np.array([70, 50, 60]) - 60) / np.std([70, 50, 60]))
    assert x[3, :2].tolist() == [0, 1]  # empty age: imputed, flagged
    xt = data.test.tensors[0][0]
    assert xt[0] == pytest.approx((1000 - 60) / np.std([70, 50, 60]), rel=1e-5)
    assert xt[4:].tolist() == [0, 0, 0, 1]  # ward "?" -> the missing slot


def test_single_file_split_is_deterministic_and_content_based(tmp_path, cfg):
    rng = np.random.default_rng(0)
    rows = [f"{a},1,4,130,{c},0,0,150,0,1.0,2,0,3,{int(a > 55)}"
            for a, c in zip(rng.integers(30, 75, 200), rng.integers(150, 350, 200))]
    rows = list(dict.fromkeys(rows))  # distinct rows
    first = TASK.load_site(_site(tmp_path / "a", rows), cfg["task"], "a")
    again = TASK.load_site(_site(tmp_path / "b", rows[::-1]), cfg["task"], "b")
    assert 0.15 < len(first.test) / len(rows) < 0.35
    assert len(first.test) == len(again.test)  # the same rows, whatever their order
    test_labels = sorted(first.test.tensors[1].tolist())
    assert test_labels == sorted(again.test.tensors[1].tolist())


def test_a_record_with_no_recorded_feature_is_skipped_and_counted(tmp_path, cfg):
    rows = [*UCI_ROWS, "?,?,?,?,0,?,?,?,?,?,?,?,?,1"]
    data = TASK.load_site(_site(tmp_path, rows), _all_train(cfg["task"]), "va")
    assert len(data.train) == 6 and data.skipped == {"all_features_missing": 1}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("58,1,4,130,230,0,0,150,0,1.0,2,0,3", "line 7: 13 fields, expected 14"),
        ("58,1,5,130,230,0,0,150,0,1.0,2,0,3,0",
         "line 7, column 'cp': '5' is not one of the declared codes \\[1, 2, 3, 4\\]"),
        ("58,1,4,130,230,0,0,150,0,1.0,2,0,3,?", "line 7: the label 'num' is missing"),
        ("58,1,4,130,230,0,0,150,0,1.0,2,0,3,yes", "line 7: label 'num' = 'yes' is not a number"),
        ("58,1,4,high,230,0,0,150,0,1.0,2,0,3,0",
         "line 7, column 'trestbps': 'high' is not a number"),
        ("58,1,4,130,inf,0,0,150,0,1.0,2,0,3,0",
         "line 7, column 'chol': 'inf' is not a finite number"),
    ],
)
def test_bad_records_name_file_line_and_what_was_expected(tmp_path, cfg, bad_row, message):
    _site(tmp_path, [*UCI_ROWS, bad_row])
    with pytest.raises(DataError, match=message) as err:
        TASK.load_site(tmp_path, cfg["task"], "h1")
    assert "processed.cleveland.data" in str(err.value)


@pytest.mark.parametrize("label_rule", [{}, {"label_threshold": None, "spec": {
    "num_features": 35, "num_classes": 5}, "label_classes": [0, 1, 2, 3, 4]}])
def test_values_are_read_a_column_at_a_time_by_the_tasks_rules(tmp_path, cfg, label_rule):
    """Each distinct text of a column is read once, by the same rules a row would be: missing
    tokens, a 0 meaning "not measured", "63" vs "63.0", codes written as floats."""
    import client.tasks.tabular as tabular

    task_cfg = {**cfg["task"], **label_rule}
    rows = [*UCI_ROWS, "1e1,-0,4.0,0.0,0,nan,1.0,NA,0,-0.5,2,,7,3.0",
            "40, 1 ,1,120,200,0,2,150,0,0,1,1,6.0,1"]
    table = tabular.read_table(_site(tmp_path, rows) / "processed.cleveland.data", task_cfg)
    parsed = tabular.parse_rows(table, task_cfg)
    assert parsed.numeric.dtype == np.float64 and parsed.categorical.dtype == np.int64
    assert parsed.numeric.shape[0] == parsed.categorical.shape[0] == len(parsed.labels) == 8
    assert np.isnan(parsed.numeric[6, [2, 3, 4, 5, 8]]).all()  # trestbps 0.0, chol 0, nan, NA, ""
    assert parsed.numeric[6, 0] == 10.0 and parsed.categorical[6, 0] == 3  # 1e1; cp "4.0"
    assert parsed.numeric[7, 0] == 40.0 and parsed.categorical[7, 0] == 0  # " 1 " -> code 1
    assert list(parsed.labels[-2:]) == ([1, 1] if not label_rule else [3, 1])


def test_the_first_bad_value_in_file_order_is_the_one_named(tmp_path, cfg):
    """Two bad values: the earlier line is named, whichever column it is in; within one line
    numeric columns come before the label."""
    rows = [*UCI_ROWS[:2], "63,1,1,145,233,1,2,150,0,2.3,3,0,6,?",  # line 3: label missing
            "63,1,1,145,abc,1,2,150,0,2.3,3,0,6,0"]  # line 4: chol not a number
    _site(tmp_path, rows)
    with pytest.raises(DataError, match=r"line 3: the label 'num' is missing"):
        TASK.load_site(tmp_path, cfg["task"], "h1")
    _site(tmp_path, [*UCI_ROWS[:2], "63,1,1,145,abc,1,2,150,0,2.3,3,0,6,?"])
    with pytest.raises(DataError, match=r"line 3, column 'chol': 'abc' is not a number"):
        TASK.load_site(tmp_path, cfg["task"], "h1")


def test_label_outside_declared_classes_and_missing_header_columns(tmp_path, cfg):
    classes = {**cfg["task"], "label_threshold": None, "label_classes": [0, 1, 2, 3],
               "spec": {"num_features": 35, "num_classes": 4}}
    _site(tmp_path, UCI_ROWS)  # the last-but-one row has num = 4
    with pytest.raises(DataError, match="line 5: label 'num' = '4' is outside the declared"):
        TASK.load_site(tmp_path, classes, "h1")
    header = {**cfg["task"], "header": "first_line", "file": "*.csv"}
    (tmp_path / "site.csv").write_text("age,sex,num\n50,1,0\n")
    with pytest.raises(DataError, match=r"site.csv: columns \['trestbps', 'chol'"):
        TASK.load_site(tmp_path, header, "h1")


def test_missing_or_ambiguous_files_and_empty_training_split(tmp_path, cfg):
    with pytest.raises(DataError, match="does not exist"):
        TASK.load_site(tmp_path / "nope", cfg["task"], "h1")
    tmp_path.joinpath("README.txt").write_text("not data")
    with pytest.raises(DataError, match="exactly one file matching 'processed.\\*.data'.*none"):
        TASK.load_site(tmp_path, cfg["task"], "h1")
    _site(tmp_path, UCI_ROWS, "processed.va.data")
    _site(tmp_path, UCI_ROWS, "processed.switzerland.data")
    with pytest.raises(DataError, match="found processed.switzerland.data, processed.va.data"):
        TASK.load_site(tmp_path, cfg["task"], "h1")
    all_test = {**cfg["task"], "test_fraction": 0.999999}
    with pytest.raises(DataError, match="site sw: .*processed.switzerland.data has zero "
                                        "training records"):
        TASK.load_site(tmp_path / "processed.switzerland.data", all_test, "sw")


def test_pooled_file_partitions_by_site_column_into_loadable_folders(tmp_path, cfg):
    task_cfg = {**cfg["task"], "header": "first_line", "file": "*.csv", "test_fraction": 0.0}
    names = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"
    centres = ["cleveland", "cleveland", "hungarian", "va", "va", "hungarian"]
    pooled = tmp_path / "pooled.csv"
    pooled.write_text("\n".join([f"{names},centre", *(f"{row},{c}" for row, c in
                                                       zip(UCI_ROWS, centres))]) + "\n")
    records = GENERATOR.index_pooled(pooled, task_cfg, site_column="centre")
    assert records.labels.tolist() == [0, 1, 0, 1, 1, 0] and not records.is_test.any()
    assert records.groups.tolist() == centres
    ids = np.flatnonzero(records.groups == "va")
    GENERATOR.write_partition(pooled, task_cfg, tmp_path / "va", ids)
    assert [p.name for p in (tmp_path / "va").iterdir()] == ["va.csv"]
    site = TASK.load_site(tmp_path / "va", task_cfg, "va")
    assert site.train.tensors[1].tolist() == [1, 1]
    # train.csv + test.csv sources keep each record's split
    source = tmp_path / "split"
    source.mkdir()
    (source / "train.csv").write_text("\n".join([names, *UCI_ROWS[:4]]) + "\n")
    (source / "test.csv").write_text("\n".join([names, *UCI_ROWS[4:]]) + "\n")
    records = GENERATOR.index_pooled(source, task_cfg)
    assert records.is_test.tolist() == [False] * 4 + [True] * 2
    GENERATOR.write_partition(source, task_cfg, tmp_path / "h2", np.array([1, 3, 5]))
    site = TASK.load_site(tmp_path / "h2", task_cfg, "h2")
    assert site.train.tensors[1].tolist() == [1, 1] and site.test.tensors[1].tolist() == [0]


def test_synthetic_sites_write_the_uci_format_deterministically_with_site_shift(tmp_path, cfg):
    task_cfg = cfg["task"]
    profiles = GENERATOR.site_profiles(task_cfg, 4, seed=0)
    tables = []
    for profile in profiles:
        folder = tmp_path / f"hospital_{profile.index}"
        GENERATOR.generate_site(folder, task_cfg, profile, seed=0)
        text = (folder / f"processed.hospital_{profile.index}.data").read_text()
        tables.append([line.split(",") for line in text.strip().split("\n")])
    GENERATOR.generate_site(tmp_path / "again", task_cfg, profiles[0], seed=0)
    again = (tmp_path / "again" / "processed.again.data").read_text()
    assert again == (tmp_path / "hospital_0" / "processed.hospital_0.data").read_text()
    for rows, profile in zip(tables, profiles):
        assert len(rows) == profile.num_train + profile.num_test
        assert {len(r) for r in rows} == {14} and rows[0][0].isdigit()  # no header line
        assert {r[13] for r in rows} <= {"0", "1", "2", "3", "4"}
    # a switzerland-like centre rarely records ca and writes cholesterol as 0
    sparse = [p.shift["w"] > 0.6 for p in profiles]
    assert any(sparse) and not all(sparse)
    for rows, is_sparse in zip(tables, sparse):
        missing_ca = np.mean([r[11] == "?" for r in rows])
        chol_zero = np.mean([r[4] == "0" for r in rows])
        assert (missing_ca > 0.5) == is_sparse and (chol_zero > 0.1) == is_sparse
        assert any("?" in r for r in rows)  # every site has some missing values
    mean_age = [np.mean([float(r[0]) for r in rows if r[0] != "?"]) for rows in tables]
    assert max(mean_age) - min(mean_age) > 6, mean_age
    loaded = [TASK.load_site(tmp_path / f"hospital_{p.index}", task_cfg, "s") for p in profiles]
    prevalence = [float(d.train_labels.mean()) for d in loaded]
    assert max(prevalence) - min(prevalence) > 0.1, prevalence
    assert len({len(rows) for rows in tables}) == 4


@pytest.mark.parametrize(("label_rule", "sha256"), [
    ({}, "7478a63f951d399a712d9035a1cbd35659917c6ab51d6a84469c11050ece3e4d"),
    ({"label_threshold": None, "label_classes": ["a", "b,c", "d"],  # a code csv must quote
      "spec": {"num_features": 35, "num_classes": 3}},
     "0e5408a06bbb847846ce59d0d4e8297562f7751b270a0f18918790d396c6abca"),
])
def test_a_seeds_synthetic_site_is_the_same_bytes_as_before(tmp_path, cfg, label_rule, sha256):
    """A seed's synthetic hospital is the file earlier versions wrote (pinned from the version
    that built each row as a list): data caches and results published for a seed stay valid.
    A deliberate change to the generator updates these hashes."""
    import hashlib

    task_cfg = {**cfg["task"], **label_rule}
    GENERATOR.generate_site(tmp_path / "pin", task_cfg,
                            GENERATOR.site_profiles(task_cfg, 2, seed=5)[1], seed=5)
    written = (tmp_path / "pin" / "processed.pin.data").read_bytes()
    assert hashlib.sha256(written).hexdigest() == sha256


def test_synthetic_records_are_learnable_and_shuffled_labels_are_not(tmp_path, cfg, one_thread):
    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 600,
                                             "test_size": 300}}
    profile = GENERATOR.site_profiles(task_cfg, 1, seed=0)[0]
    GENERATOR.generate_site(tmp_path, task_cfg, profile, seed=0)
    data = TASK.load_site(tmp_path, task_cfg, "h1")
    x, y = data.train.tensors
    results = {}
    for name in ("real", "shuffled"):
        runs = []
        for seed in range(5):  # one random init/permutation can rank by chance: average a few
            labels = y
            if name == "shuffled":
                labels = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
            torch.manual_seed(seed)
            model = build_model({"name": "mlp", "hidden": [], "dropout": 0.0},
                                TASK.input_spec(task_cfg))
            train_local(model, TensorDataset(x, labels),
                        LocalTrainingConfig(epochs=10, batch_size=32, lr=0.05, momentum=0.9),
                        seed=seed)
            metrics = evaluate(model, data.test, 2)
            runs.append((metrics["balanced_accuracy"], metrics["auroc"]))
        results[name] = np.mean(runs, axis=0)
    assert results["real"][0] > 0.7 and results["real"][1] > 0.8, results
    assert results["shuffled"][0] < 0.6 and results["shuffled"][1] < 0.65, results


@pytest.mark.parametrize("hidden", [[32, 16], []])
def test_mlp_and_logistic_regression_train_under_opacus_dp_sgd(hidden):
    model = build_model({"name": "mlp", "hidden": hidden, "dropout": 0.1},
                        {"num_features": 35, "num_classes": 2})
    assert ModuleValidator.validate(model, strict=True) == []
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(hidden) + 1
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 35, generator=generator), torch.arange(64) % 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=16),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(private(x), y).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
