"""The interface every clinical task offers (in the spirit of FLamby's one-folder-per-dataset).

A task reads one site's folder into tensors (:meth:`Task.load_site`) and tells the model
builder what it is built for (:meth:`Task.input_spec`): what a hospital runs, nothing more.
Synthetic sites and pooled-dataset partitions in the same file formats are written by
``simulations/synthetic/`` (simulation only; a hospital never needs them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset


class DataError(ValueError):
    """A site's data is missing or not in the expected format; the message names the file."""


# Byte-order marks of the encodings a spreadsheet's "Unicode text" export writes instead of UTF-8.
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _first_undecodable_line(path: Path) -> tuple[int, str]:
    """Line number (1-based) and reason of the first line that is not UTF-8 (error path only)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, f"byte 0x{raw[err.start]:02x}: {err.reason}"
    return 1, "invalid UTF-8"


def text_lines(path: Path, expected: str) -> Iterator[str]:
    """The lines of a UTF-8 text file (line endings kept, as ``open(newline="")`` gives them,
    so ``csv.reader`` can read them), streamed.

    Every way the file can be unusable is a :class:`DataError` naming the file, with the line
    where there is one, and ``expected`` (what the file should be): missing, a directory,
    unreadable, not UTF-8 (a latin-1 or UTF-16 export, binary data), or holding a NUL byte
    (binary data, or UTF-16 without a byte-order mark). Raw ``UnicodeDecodeError``s would name
    neither the file nor the line, and NUL bytes would otherwise pass into ids and values.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory; expected {expected}")
    if not path.exists():
        raise DataError(f"{path}: missing; expected {expected}")
    try:
        with open(path, "rb") as handle:
            start = handle.read(2)
        if start in _UTF16_BOMS:
            raise DataError(f"{path}: UTF-16 text (byte-order mark); expected {expected} "
                            "encoded as UTF-8 (re-save it as UTF-8)")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if "\x00" in line:
                    raise DataError(f"{path}, line {number}: a NUL byte; expected {expected} as "
                                    "UTF-8 text (is it a binary file or UTF-16 text?)")
                yield line
    except UnicodeDecodeError:
        number, reason = _first_undecodable_line(path)
        raise DataError(f"{path}, line {number}: not UTF-8 text ({reason}); expected {expected} "
                        "encoded as UTF-8 (a latin-1/Windows export? re-save it as UTF-8)"
                        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); expected {expected}"
                        ) from err


def read_text_file(path: Path, expected: str) -> str:
    """The whole text of a UTF-8 file; the same checks and messages as :func:`text_lines`."""
    return "".join(text_lines(path, expected))


# Where a task's standardisation statistics come from (``task.standardize``):
# - ``site``: the site's own training split. Every patient's encoded features then depend on
#   every other training patient (an extreme value shifts the mean and sd), an influence that
#   DP-SGD's per-example clipping does not bound: not covered by a DP guarantee.
# - ``reference``: fixed reference values from config (``task.reference``: published summary
#   statistics, outside any site's data; no privacy cost). A patient's features depend on that
#   patient alone, and a missing value is imputed with the reference mean.
# ``auto`` (reference under privacy=dp, site otherwise) is resolved with the run settings
# (server/settings.py) before any site loads data; a loader never guesses it.
STANDARDIZE = ("site", "reference")


def standardize_mode(task_cfg: Mapping[str, Any]) -> str:
    """``task.standardize`` as a loader applies it: ``site`` or ``reference``."""
    mode = str(task_cfg.get("standardize", "site"))
    if mode == "auto":
        raise DataError("task.standardize=auto reached a site loader unresolved: it is resolved "
                        "against privacy.name with the run settings (server/settings.py); pass "
                        "site or reference")
    if mode not in STANDARDIZE:
        raise DataError(f"task.standardize must be one of {list(STANDARDIZE)} (or auto), "
                        f"got {mode!r}")
    return mode


def reference_stats(task_cfg: Mapping[str, Any], names: Sequence[str],
                    ) -> dict[str, tuple[float, float]]:
    """``task.reference``'s (mean, sd) for each of ``names``; a name without one, or an sd that
    is not > 0, is a :class:`DataError` naming the key."""
    table = task_cfg.get("reference") or {}
    stats = {}
    for name in names:
        entry = table.get(name)
        if entry is None:
            raise DataError(f"task.standardize=reference needs task.reference.{name}: [mean, sd] "
                            f"(published reference values, never a site's own data); "
                            f"task.reference has {sorted(table)}")
        if len(entry) != 2 or not float(entry[1]) > 0:
            raise DataError(f"task.reference.{name} must be [mean, sd] with sd > 0, got "
                            f"{list(entry)}")
        stats[name] = (float(entry[0]), float(entry[1]))
    return stats


@dataclass
class SiteData:
    """One hospital's data, ready for training: nothing here leaves the site."""

    site_id: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    source: str  # where it was read from, for error messages and the report
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of records left out

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.tensors[-1].numpy()


class Task(ABC):
    name: str

    @staticmethod
    def input_spec(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """What the model is built for (``task.spec`` in config: e.g. channels, num_classes).

        It lives in config, not in data, so the server can build the initial global model
        without seeing any site's files; each site checks its files against it.
        """
        return dict(task_cfg["spec"])

    @abstractmethod
    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        """Read one site's files. Raises :class:`DataError` naming the file on bad input."""
