"""A headered CSV read as records only (task.header=none) names the fix, not just the symptom."""

from __future__ import annotations

import pytest

from client.tasks import DataError, get_task
from server.settings import compose

TASK = get_task("tabular")
COLUMNS = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"
ROWS = ["63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0",
        "37,1,3,130,250,0,0,187,0,3.5,3,0,3,0",
        "57,0,4,120,354,0,0,163,1,0.6,1,0,3,0"]


@pytest.fixture(scope="module")
def task_cfg():
    cfg = compose(["task=tabular"])["task"]
    assert cfg["header"] == "none"  # the default reads UCI files: no header line
    return cfg


def _site(tmp_path, lines):
    (tmp_path / "processed.cleveland.data").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_a_header_line_under_header_none_says_to_set_first_line(tmp_path, task_cfg):
    with pytest.raises(DataError) as err:
        TASK.load_site(_site(tmp_path, [COLUMNS, *ROWS]), task_cfg, "cleveland")
    message = str(err.value)
    assert "line 1, column 'age': 'age' is not a number" in message  # the symptom stays
    assert "line 1 looks like a header (age, sex, cp, trestbps, ...)" in message
    assert "set task.header=first_line" in message
    # and the hint is right: the same file reads with the setting it names
    data = TASK.load_site(tmp_path, {**task_cfg, "header": "first_line"}, "cleveland")
    assert len(data.train) + len(data.test) == len(ROWS)


def test_a_bad_value_in_a_real_first_record_gets_no_header_hint(tmp_path, task_cfg):
    bad = "sixty," + ROWS[0].split(",", 1)[1]
    with pytest.raises(DataError, match="'sixty' is not a number") as err:
        TASK.load_site(_site(tmp_path, [bad, *ROWS]), task_cfg, "cleveland")
    assert "header" not in str(err.value)


def test_a_header_in_other_words_is_caught_at_the_first_failing_column(tmp_path, task_cfg):
    # names unlike task.columns (a spreadsheet export): still no number in the line
    header = ",".join(name.upper() for name in COLUMNS.split(","))
    with pytest.raises(DataError, match=r"looks like a header \(AGE, SEX, CP, TRESTBPS, \.\.\.\)"
                       r": if the file names its columns on its first line, set "
                       r"task.header=first_line"):
        TASK.load_site(_site(tmp_path, [header, *ROWS]), task_cfg, "cleveland")
