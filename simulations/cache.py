"""Site folders the simulation writes (synthetic or partitioned) are written once, whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` by ``fill(staging)`` then an atomic rename, unless it exists already.

    ``staging`` is an empty folder with ``target``'s name (a site's file names may follow its
    folder's name) inside a hidden temporary folder next to ``target``. An interrupted run
    leaves no half-written folder (only the hidden one, removed on the way out); a concurrent
    writer (another run, or another simulated site's process) that finished first wins.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    hidden = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    staging = hidden / target.name
    staging.mkdir()
    try:
        fill(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(hidden, ignore_errors=True)
    return target
