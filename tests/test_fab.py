"""The app a hospital installs (the FAB Flower builds from the release folder) holds the code
and config the sites approve, and never a key, certificate, site configuration or state file,
even when the coordinator provisioned the federation inside the checkout."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from client.approval import manifest
from server.provision import provision
from tests.helpers import ROOT


def _release_with_a_federation_inside(dest: Path) -> Path:
    for item in ("client", "server", "models", "privacy", "conf", "simulations", "tests",
                 "docs"):
        shutil.copytree(ROOT / item, dest / item,
                        ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    # the mistake issue 17 found (provisioning now refuses it unless told: tests/test_provision)
    provision(dest / "federation", ["hospital_a", "hospital_b"], inside_app=True)
    state = dest / "federation" / "state" / "hospital_a"
    state.mkdir(parents=True)
    (state / "privacy_ledger.json").write_text("{}")
    (state / "egress.jsonl").write_text("{}\n")
    (dest / "conf" / "notes.json").write_text("{}")  # a stray state file among the config
    return dest


def test_the_fab_holds_exactly_the_approved_files_and_no_secret(tmp_path):
    release = _release_with_a_federation_inside(tmp_path / "release")
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(release))).namelist())
    leaked = sorted(n for n in names if n.startswith(("federation/", "tests/", "docs/",
                                                      "simulations/"))
                    or n.endswith((".key", ".pub", ".crt", ".json", ".jsonl"))
                    or n.rsplit("/", 1)[-1] in ("site.toml", "connection.toml"))
    assert not leaked, leaked
    approved = {line.split(" ")[0] for line in manifest(release)}
    shipped = {n for n in names if n not in (".info/CONTENT", "README.md")
               and not n.startswith(".info/")}
    assert shipped == approved  # the hash a site approves covers exactly what runs
    assert "client/app.py" in shipped and "conf/config.yaml" in shipped
