"""What writes a site folder for a simulation, per clinical task: synthetic hospitals
(:meth:`SiteGenerator.generate_site`) and the shares of a pooled dataset dealt out to sites
(:meth:`SiteGenerator.index_pooled`, :meth:`SiteGenerator.write_partition`).

Apart from the task loaders in ``client/tasks/`` (FLamby keeps its dataset creation scripts
apart from its loaders): a hospital runs only the loader, never a generator. A generator writes
exactly the file format the task's loader reads, so the simulation exercises the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital differs from the others (size, prevalence, acquisition shift)."""

    index: int
    num_train: int
    num_test: int
    class_weights: tuple[float, ...]
    shift: Mapping[str, float]


@dataclass
class PooledRecords:
    """A pooled dataset (``data.path``) seen as records that can be dealt out to sites.

    One entry per record (an image, an ICU stay, a note, a table row), in file order.
    """

    labels: np.ndarray  # int class per record (label-skew partitions use it)
    is_test: np.ndarray  # bool per record: True where the format marks it as test split
    groups: np.ndarray | None = None  # value of ``data.site_column`` per record, if asked

    def __len__(self) -> int:
        return len(self.labels)


class SiteGenerator(ABC):
    """Writes site folders in one task's real format (``name`` is the task's name)."""

    name: str

    def site_profiles(
        self, task_cfg: Mapping[str, Any], num_sites: int, seed: int
    ) -> list[SiteProfile]:
        """Non-identical hospitals: sizes vary ~×3, prevalence varies, each has its own shift."""
        synth = task_cfg["synthetic"]
        num_classes = int(task_cfg["spec"]["num_classes"])
        rng = np.random.default_rng([seed, 7919])
        profiles = []
        for i in range(num_sites):
            size_factor = float(np.exp(rng.uniform(np.log(0.6), np.log(1.8))))
            weights = rng.dirichlet(np.full(num_classes, float(synth.get("label_alpha", 4.0))))
            profiles.append(
                SiteProfile(
                    index=i,
                    num_train=max(8, int(round(synth["train_size"] * size_factor))),
                    num_test=max(8, int(round(synth["test_size"] * size_factor))),
                    class_weights=tuple(float(w) for w in weights),
                    shift={"u": float(rng.uniform()), "v": float(rng.uniform()),
                           "w": float(rng.uniform())},
                )
            )
        return profiles

    @abstractmethod
    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        """Write one synthetic site's files into ``folder`` in the task's real format."""

    @abstractmethod
    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        """Describe a pooled dataset's records (labels, split, optional site column)."""

    @abstractmethod
    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        """Write the pooled records with indices ``records`` into ``folder`` in the task's own
        site format, keeping each record's train/test membership, so that the task's
        ``load_site`` reads it like any hospital's folder."""
