"""Hospital splits: data.root folders, a pooled data.path split by iid/dirichlet/quantity/column."""

from __future__ import annotations

import numpy as np
import pytest

from client.tasks import DataError, get_task
from server.settings import compose
from simulations.partition import assign_records
from simulations.sites import site_folders
from simulations.synthetic import PooledRecords, get_generator


def _records(n=400, classes=2, test_every=5, groups=None):
    labels = np.arange(n) % classes
    return PooledRecords(labels=labels, is_test=(np.arange(n) % test_every == 0),
                         groups=groups)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_every_record_goes_to_exactly_one_site(method):
    parts = assign_records(_records(), 4, method, alpha=0.5, seed=0)
    together = np.sort(np.concatenate(parts))
    assert len(parts) == 4 and np.array_equal(together, np.arange(400))
    again = assign_records(_records(), 4, method, alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # seeded


def test_dirichlet_skews_labels_and_quantity_skews_sizes_iid_does_neither():
    rec = _records(2000)
    def prevalence(parts):  # of sites with enough records to estimate it
        return [rec.labels[p].mean() for p in parts if len(p) >= 50]
    iid = assign_records(rec, 4, "iid", alpha=0.1, seed=1)
    skewed = assign_records(rec, 4, "dirichlet", alpha=0.1, seed=1)
    sized = assign_records(rec, 4, "quantity", alpha=0.5, seed=1)
    assert np.ptp(prevalence(iid)) < 0.05 and np.ptp(prevalence(skewed)) > 0.3
    assert np.ptp([len(p) for p in iid]) <= 4 and np.ptp([len(p) for p in sized]) > 200
    assert np.ptp(prevalence(sized)) < 0.1
    for parts in (iid, skewed, sized):  # each site gets test records of its own
        assert all(rec.is_test[p].any() for p in parts if len(p) > 50)


def test_column_partition_makes_one_site_per_value():
    groups = np.array(["cleveland", "va", "va", "hungarian"] * 25)
    parts = assign_records(_records(100, groups=groups), 99, "column", alpha=1, seed=0)
    assert [len(p) for p in parts] == [25, 25, 50]
    with pytest.raises(DataError, match="site_column"):
        assign_records(_records(100), 3, "column", alpha=1, seed=0)


def test_pooled_npz_split_into_site_folders_read_by_the_real_loader(tmp_path):
    cfg = compose(["num_hospitals=1", "task.synthetic.train_size=120",
                   "task.synthetic.test_size=60"])
    task = get_task("images")
    generator = get_generator("images")
    generator.generate_site(tmp_path / "pooled", cfg["task"],
                            generator.site_profiles(cfg["task"], 1, seed=3)[0], seed=3)
    pooled = task.load_site(tmp_path / "pooled", cfg["task"], "pooled")
    cfg = compose(["num_hospitals=3", f"data.path={tmp_path / 'pooled' / 'scans.npz'}",
                   "data.partition=iid"])
    folders = site_folders(cfg)
    assert list(folders) == ["hospital_01", "hospital_02", "hospital_03"]
    sites = [task.load_site(f, cfg["task"], s) for s, f in folders.items()]
    assert sum(len(s.train) for s in sites) == len(pooled.train)
    assert sum(len(s.test) for s in sites) == len(pooled.test)  # the file's test split kept
    assert site_folders(cfg) == folders  # cached, not rewritten


def test_data_root_folders_are_the_hospitals(tmp_path):
    for name in ("st_marys", "general"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.txt").write_text("not a site")
    cfg = compose([f"data.root={tmp_path}"])
    assert list(site_folders(cfg)) == ["general", "st_marys"]
    with pytest.raises(DataError, match="not a directory"):
        site_folders(compose([f"data.root={tmp_path / 'missing'}"]))
    with pytest.raises(DataError, match="not both"):
        site_folders(compose([f"data.root={tmp_path}", f"data.path={tmp_path}"]))
