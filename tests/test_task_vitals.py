"""Vitals task: PhysioNet 2012 files and long CSVs -> hourly tensors, the generator, the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from client.evaluation import evaluate
from client.tasks import DataError, get_task
from client.tasks.vitals import is_test_stay
from client.training import LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

TASK = get_task("vitals")
GENERATOR = get_generator("vitals")  # synthetic sites and partitions (simulation only)
OUTCOMES_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"


@pytest.fixture(scope="module")
def cfg():
    return compose(["task=vitals"])


@pytest.fixture
def small(cfg):
    """Three variables, all stays in the training split (so statistics are easy to check)."""
    return {**cfg["task"], "variables": ["HR", "pH", "GCS"], "test_fraction": 0.0,
            "spec": {**cfg["task"]["spec"], "num_variables": 3}}


def _record(folder, record_id, rows, age="54", height="-1", icu="4", weight="-1"):
    """A PhysioNet 2012 record file: descriptors at 00:00 first, then measurements."""
    lines = ["Time,Parameter,Value", f"00:00,RecordID,{record_id}", f"00:00,Age,{age}",
             "00:00,Gender,0", f"00:00,Height,{height}", f"00:00,ICUType,{icu}",
             f"00:00,Weight,{weight}", *rows]
    path = folder / "set-a" / f"{record_id}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _outcomes(folder, deaths: dict[int, int]):
    rows = [OUTCOMES_HEADER] + [f"{rid},15,5,9,-1,{d}" for rid, d in deaths.items()]
    (folder / "Outcomes-a.txt").write_text("\n".join(rows) + "\n")


def _messy_site(folder):
    _record(folder, 132539, [
        "00:07,GCS,15",
        "00:37,HR,80",
        "00:52,HR,90",            # same hour: averaged
        "02:15,Cholesterol,212",  # a real parameter this task does not use
        "03:00,pH,735",           # entry error (decimal point lost): implausible, dropped
        "03:10,pH,7.30",
        "05:00,HR,-1",            # missing marker inside the series
        "30:15,HR,120",           # hours go past 23
        "48:00,HR,150",           # outside the 48 h window
    ], height="170.2", weight="80")
    _record(folder, 132540, ["01:00,HR,100", "01:30,GCS,9"], age="80", icu="2")
    _record(folder, 132541, ["50:00,HR,77"])            # nothing inside the window
    _record(folder, 132599, ["00:30,HR,70"])            # no line in the outcomes file
    _outcomes(folder, {132539: 0, 132540: 1, 132541: 0, 132542: 1})  # 132542 has no file


def test_physionet_stays_become_hourly_values_masks_and_time_since(tmp_path, small):
    _messy_site(tmp_path)
    data = TASK.load_site(tmp_path, small, "h1")
    series, static, labels = data.train.tensors
    assert series.shape == (2, 48, 9) and static.shape == (2, 12)
    assert labels.tolist() == [0, 1] and len(data.test) == 0
    assert data.skipped == {
        "stay_without_record": 1, "record_without_outcome": 1, "no_observations": 1,
        "unused_variable_observations": 1, "implausible_value_observations": 1,
        "missing_value_observations": 1,
    }
    # HR observed values in training: mean(80, 90)=85 at 00h and 120 at 30h (stay 1), 100 (stay 2)
    raw = np.array([80.0, 90.0, 120.0, 100.0])
    mean, sd = raw.mean(), raw.std()
    hr, hr_mask, hr_since = series[0, :, 0], series[0, :, 3], series[0, :, 6]
    assert hr[0].item() == pytest.approx(((80 - mean) / sd + (90 - mean) / sd) / 2, abs=1e-5)
    assert hr[29].item() == pytest.approx(hr[0].item())       # carried forward until 30 h
    assert hr[30].item() == pytest.approx((120 - mean) / sd, abs=1e-5)
    assert hr_mask.nonzero().flatten().tolist() == [0, 30]
    assert hr_since[0].item() == 0 and hr_since[5].item() == pytest.approx(5 / 48)
    # pH only at 3 h; before it the value is the site mean (0) and time-since counts from admission
    assert series[0, :3, 1].abs().max().item() == 0
    assert series[0, :, 4].nonzero().flatten().tolist() == [3]
    assert series[0, 2, 7].item() == pytest.approx(3 / 48)
    # Stay 2 never had pH measured: all-zero values and mask
    assert series[1, :, 1].abs().max().item() == 0 and series[1, :, 4].sum().item() == 0
    # Static: Age, Gender, Height, Weight -> (value, missing flag); ICUType one-hot (4 vs 2)
    assert static[0, 5].item() == 0 and static[1, 5].item() == 1  # height missing in stay 2
    assert static[0, 8:].tolist() == [0, 0, 0, 1] and static[1, 8:].tolist() == [0, 1, 0, 0]
    assert static[0, 0].item() == pytest.approx(-1.0) and static[1, 0].item() == pytest.approx(1.0)


def _hr_site(folder, extreme_hr="95", extreme_age="60"):
    """Five training stays; the first one's heart rate and age can be made extreme."""
    _record(folder, 150000, [f"01:00,HR,{extreme_hr}", "02:00,pH,7.35"], age=extreme_age,
            weight="90")
    for i, rid in enumerate(range(150001, 150005)):
        _record(folder, rid, [f"0{i}:30,HR,{70 + 10 * i}", f"03:00,pH,7.{30 + i}", "04:00,GCS,14"],
                age=str(50 + 5 * i), weight=str(70 + 5 * i))
    _outcomes(folder, {rid: rid % 2 for rid in range(150000, 150005)})


def test_under_reference_one_stay_moves_no_other_stays_tensors(tmp_path, small):
    """With reference standardisation an extreme stay changes its own tensors only (what
    DP-SGD's per-example clipping bounds); with the site's statistics every other stay's
    values move."""
    for mode, others_move in (("reference", False), ("site", True)):
        task_cfg = {**small, "standardize": mode}
        _hr_site(tmp_path / mode / "a")
        _hr_site(tmp_path / mode / "b", extreme_hr="290", extreme_age="110")
        before = TASK.load_site(tmp_path / mode / "a", task_cfg, "a").train.tensors
        after = TASK.load_site(tmp_path / mode / "b", task_cfg, "b").train.tensors
        for x, x_changed in zip(before[:2], after[:2], strict=True):  # series, static
            assert not torch.equal(x_changed[0], x[0])  # the stay's own tensors change
            assert torch.equal(x_changed[1:], x[1:]) != others_move, mode


def test_reference_standardisation_uses_the_configured_values_on_their_scale(tmp_path, small):
    task_cfg = {**small, "variables": ["HR", "pH", "Lactate"], "standardize": "reference"}
    _record(tmp_path, 150100, ["01:00,HR,80", "02:00,Lactate,4.0"], age="81")
    _record(tmp_path, 150101, ["01:00,HR,100"])
    _outcomes(tmp_path, {150100: 1, 150101: 0})
    series, static, _ = TASK.load_site(tmp_path, task_cfg, "h1").train.tensors
    reference = task_cfg["reference"]
    hr_mean, hr_sd = reference["HR"]
    assert series[0, 1, 0].item() == pytest.approx((80 - hr_mean) / hr_sd, abs=1e-5)
    # a log variable on the log1p scale its reference is written in
    lac_mean, lac_sd = reference["Lactate"]
    assert series[0, 2, 2].item() == pytest.approx((np.log1p(4.0) - lac_mean) / lac_sd, abs=1e-5)
    # before the first observation, and never measured: the reference mean (0)
    assert series[0, 0, 0].item() == 0 and series[1, :, 1].abs().max().item() == 0
    age_mean, age_sd = reference["Age"]
    assert static[0, 0].item() == pytest.approx((81 - age_mean) / age_sd, abs=1e-5)
    assert static[1, 5].item() == 1 and static[1, 4].item() == 0  # height missing: mean, flag
    without_hr = {**task_cfg, "reference": {k: v for k, v in reference.items() if k != "HR"}}
    with pytest.raises(DataError, match="task.reference.HR"):
        TASK.load_site(tmp_path, without_hr, "h1")


def test_standardize_auto_is_reference_under_dp_and_site_otherwise():
    assert compose(["task=vitals", "privacy=dp"])["task"]["standardize"] == "reference"
    assert compose(["task=vitals"])["task"]["standardize"] == "site"


def test_test_split_is_a_stable_hash_and_uses_training_statistics_only(tmp_path, small):
    task_cfg = {**small, "test_fraction": 0.5}
    ids = list(range(140000, 140020))
    for i, rid in enumerate(ids):
        _record(tmp_path, rid, [f"01:00,HR,{60 + 5 * i}"])
    _outcomes(tmp_path, {rid: i % 2 for i, rid in enumerate(ids)})
    data = TASK.load_site(tmp_path, task_cfg, "h1")
    in_test = [is_test_stay(str(rid), 0.5) for rid in ids]
    assert len(data.test) == sum(in_test) and 0 < len(data.test) < len(ids)
    train_hr = np.array([60 + 5 * i for i, t in enumerate(in_test) if not t], dtype=float)
    test_hr = np.array([60 + 5 * i for i, t in enumerate(in_test) if t], dtype=float)
    expected = (test_hr - train_hr.mean()) / train_hr.std()
    np.testing.assert_allclose(data.test.tensors[0][:, 1, 0].numpy(), expected, rtol=1e-5)
    assert data.test.tensors[-1].tolist() == [i % 2 for i, t in enumerate(in_test) if t]


def test_long_csv_gives_the_same_tensors_as_the_physionet_files(tmp_path, small):
    _messy_site(tmp_path / "physionet")
    events = [
        "stay_id,time_hours,variable,value",
        "132539,0,Age,54", "132539,0,Gender,0", "132539,0,Height,170.2", "132539,0,ICUType,4",
        "132539,0,Weight,80", "132539,0.1167,GCS,15", "132539,0.6167,HR,80",
        "132539,0.8667,HR,90", "132539,2.25,Cholesterol,212", "132539,3,pH,735",
        "132539,3.1667,pH,7.30", "132539,5,HR,", "132539,30.25,HR,120", "132539,48,HR,150",
        "132540,1.5,GCS,9", "132540,0,Age,80", "132540,0,Gender,0", "132540,0,Height,NaN",
        "132540,0,ICUType,2", "132540,1,HR,100",
        "132541,50,HR,77", "132599,0.5,HR,70",
    ]
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "events.csv").write_text("\n".join(events) + "\n")
    (folder / "labels.csv").write_text("stay_id,label\n132539,0\n132540,1\n132541,0\n132542,1\n")
    physionet = TASK.load_site(tmp_path / "physionet", small, "a")
    long_csv = TASK.load_site(folder, small, "b")
    for a, b in zip(physionet.train.tensors, long_csv.train.tensors, strict=True):
        torch.testing.assert_close(a, b)
    assert long_csv.skipped == physionet.skipped


@pytest.mark.parametrize("line, match", [
    ("1:5x,HR,80", r"132540\.txt:9: expected 'HH:MM,Parameter,Value'"),
    ("01:00,HR", r"132540\.txt:9: expected"),
    ("01:00,HR,eighty", r"132540\.txt:9: .*numeric value"),
])
def test_a_malformed_record_line_names_the_file_and_line(tmp_path, small, line, match):
    _messy_site(tmp_path)
    _record(tmp_path, 132540, ["00:30,HR,70", line])
    with pytest.raises(DataError, match=match):
        TASK.load_site(tmp_path, small, "h1")


def test_bad_files_raise_clear_errors(tmp_path, small):
    with pytest.raises(DataError, match="does not exist"):
        TASK.load_site(tmp_path / "nowhere", small, "h1")
    with pytest.raises(DataError, match="found neither set-a/"):
        TASK.load_site(tmp_path, small, "h1")
    _messy_site(tmp_path)
    (tmp_path / "set-a" / "132540.txt").write_text("00:00,RecordID,132540\n")
    with pytest.raises(DataError, match=r"132540\.txt:1: expected the header"):
        TASK.load_site(tmp_path, small, "h1")
    _messy_site(tmp_path)
    (tmp_path / "set-a" / "132540.txt").write_text("Time,Parameter,Value\n00:00,RecordID,132541\n")
    with pytest.raises(DataError, match=r"132540\.txt:2: RecordID 132541 does not match"):
        TASK.load_site(tmp_path, small, "h1")
    _messy_site(tmp_path)
    (tmp_path / "Outcomes-a.txt").write_text(f"{OUTCOMES_HEADER}\n132539,1,1,1,-1,0\n"
                                             "132540,1,1,1,-1,2\n")
    with pytest.raises(DataError, match=r"Outcomes-a\.txt:3: In-hospital_death='2'"):
        TASK.load_site(tmp_path, small, "h1")
    (tmp_path / "Outcomes-a.txt").write_text("RecordID,Survival\n132539,-1\n")
    with pytest.raises(DataError, match=r"lacks \['In-hospital_death'\]"):
        TASK.load_site(tmp_path, small, "h1")
    long = tmp_path / "long"
    long.mkdir()
    (long / "events.csv").write_text("stay_id,time_hours,variable,value\n7,soon,HR,80\n")
    (long / "labels.csv").write_text("stay_id,label\n7,0\n")
    with pytest.raises(DataError, match=r"events\.csv:2: expected stay_id, numeric time_hours"):
        TASK.load_site(long, {**small, "format": "long_csv"}, "h1")
    (long / "events.csv").write_text("stay_id,time_hours,variable,value\n\n7,1.0,HR\n")
    with pytest.raises(DataError, match=r"events\.csv:3: expected 4 fields"):
        TASK.load_site(long, {**small, "format": "long_csv"}, "h1")
    (long / "events.csv").write_text("stay,time_hours,variable,value\n7,1.0,HR,80\n")
    with pytest.raises(DataError, match=r"events\.csv:1: header .* lacks \['stay_id'\]"):
        TASK.load_site(long, {**small, "format": "long_csv"}, "h1")


def test_a_site_without_usable_training_stays_is_an_error_naming_it(tmp_path, small):
    _record(tmp_path, 132541, ["50:00,HR,77"])
    _outcomes(tmp_path, {132541: 0})
    with pytest.raises(DataError, match=r"site h7: .* zero training stays .*no_observations"):
        TASK.load_site(tmp_path, small, "h7")


def test_spec_must_agree_with_the_variable_list(tmp_path, cfg):
    task_cfg = {**cfg["task"], "variables": ["HR", "MAP"]}
    with pytest.raises(ValueError, match="num_variables=16 .* lists 2"):
        TASK.input_spec(task_cfg)


def test_pooled_physionet_folder_splits_into_sites_keeping_each_stays_split(tmp_path, cfg):
    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 30,
                                             "test_size": 10}}
    profile = GENERATOR.site_profiles(task_cfg, 1, seed=3)[0]
    GENERATOR.generate_site(tmp_path / "pooled", task_cfg, profile, seed=3)
    records = GENERATOR.index_pooled(tmp_path / "pooled", task_cfg, site_column="ICUType")
    assert len(records) == profile.num_train + profile.num_test
    units = sorted(set(records.groups.tolist()))
    assert set(units) <= {"1", "2", "3", "4"} and len(units) >= 2
    total = 0
    for unit in units:
        ids = np.flatnonzero(records.groups == unit)
        GENERATOR.write_partition(tmp_path / "pooled", task_cfg, tmp_path / unit, ids)
        written = sorted(p.stem for p in (tmp_path / unit / "set-a").glob("*.txt"))
        assert len(written) == len(ids)
        assert all(f"00:00,ICUType,{unit}" in (tmp_path / unit / "set-a" / f"{w}.txt").read_text()
                   for w in written)
        if (~records.is_test[ids]).any():
            site = TASK.load_site(tmp_path / unit, task_cfg, unit)
            assert len(site.test) == records.is_test[ids].sum()
        total += len(ids)
    assert total == len(records)


def test_synthetic_sites_are_deterministic_realistic_and_different(tmp_path, cfg):
    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 40,
                                             "test_size": 15}}
    profiles = GENERATOR.site_profiles(task_cfg, 3, seed=0)
    for i, profile in enumerate(profiles[:2]):
        GENERATOR.generate_site(tmp_path / f"h{i}", task_cfg, profile, seed=0)
    GENERATOR.generate_site(tmp_path / "again", task_cfg, profiles[0], seed=0)
    first = sorted((tmp_path / "h0" / "set-a").iterdir())
    assert [p.read_bytes() for p in first] == [
        p.read_bytes() for p in sorted((tmp_path / "again" / "set-a").iterdir())]
    assert (tmp_path / "h0" / "Outcomes-a.txt").read_text().splitlines()[0] == OUTCOMES_HEADER
    lines = first[0].read_text().splitlines()
    assert lines[0] == "Time,Parameter,Value"
    assert [ln.split(",")[1] for ln in lines[1:7]] == [
        "RecordID", "Age", "Gender", "Height", "ICUType", "Weight"]
    assert all(ln.startswith("00:00,") for ln in lines[1:7])
    assert len(first) == profiles[0].num_train + profiles[0].num_test
    sites = [TASK.load_site(tmp_path / f"h{i}", task_cfg, f"h{i}") for i in range(2)]
    for site in sites:
        series = site.train.tensors[0]
        assert torch.isfinite(series).all() and series[:, :, 16:32].sum() > 0
        assert site.skipped["unused_variable_observations"] > 0  # Urine, MechVent
    # the site shift: how often the bedside vitals are charted differs between hospitals
    hr_rates = [float(s.train.tensors[0][:, :, 16].mean()) for s in sites]
    shifts = [p.shift["u"] for p in profiles[:2]]
    assert (hr_rates[0] - hr_rates[1]) * (shifts[0] - shifts[1]) < 0  # sparser where u is larger
    assert len({round(p.class_weights[1], 3) for p in profiles}) == 3
    assert all(0.03 <= p.class_weights[1] <= 0.6 for p in profiles)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_models_are_opacus_ready(cfg, name):
    torch.manual_seed(0)
    model = build_model({**cfg["model"], "name": name}, cfg["task"]["spec"])
    assert ModuleValidator.validate(model, strict=True) == []
    data = TensorDataset(torch.randn(16, 48, 48), torch.randn(16, 12), torch.randint(0, 2, (16,)))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    series, static, labels = next(iter(loader))
    torch.nn.functional.cross_entropy(private(series, static), labels).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert private(series[:3], static[:3]).shape == (3, 2)


def test_synthetic_mortality_is_learnable_and_shuffled_labels_are_not(tmp_path, cfg):
    task_cfg = cfg["task"]
    profile = GENERATOR.site_profiles(task_cfg, 1, seed=1)[0]
    profile = type(profile)(profile.index, 300, 150, (0.75, 0.25), profile.shift)
    GENERATOR.generate_site(tmp_path, task_cfg, profile, seed=1)
    data = TASK.load_site(tmp_path, task_cfg, "h1")
    series, static, labels = data.train.tensors

    def test_auroc(y: torch.Tensor) -> float:
        torch.manual_seed(0)
        model = build_model(cfg["model"], task_cfg["spec"])
        train_local(model, TensorDataset(series, static, y),
                    LocalTrainingConfig(epochs=3, batch_size=32, lr=0.05, momentum=0.9), seed=0)
        return evaluate(model, data.test, 2)["auroc"]

    real = test_auroc(labels)
    # A shuffled-label model learns no mortality signal, but it does not sit exactly at 0.5:
    # fitting the base rate moves weights along non-centred inputs (masks), and sicker patients
    # are measured more often, so it often lands below chance. It must never beat chance.
    shuffled = [test_auroc(labels[torch.randperm(len(labels),
                                                 generator=torch.Generator().manual_seed(k))])
                for k in (1, 2, 3)]
    assert real > 0.78, (real, shuffled)
    assert float(np.mean(shuffled)) < 0.6, (real, shuffled)
    assert max(shuffled) < real - 0.1, (real, shuffled)
