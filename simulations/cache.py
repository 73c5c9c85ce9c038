"""Site folders the simulation writes (synthetic or partitioned) are written once, whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` by ``fill(staging)`` then an atomic rename, unless it exists already.

    An interrupted run leaves no half-written folder (only a hidden staging folder, removed
    on the way out); a concurrent run that finished the same folder first wins.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
