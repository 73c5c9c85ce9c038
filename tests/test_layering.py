"""The layering the design card asks for, checked on the source: a hospital's package
(client/) never imports the coordinator's (server/) or the simulation's (simulations/), the
server never imports client/, and the shared packages (privacy/, models/) import neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("client", "server", "simulations", "privacy", "models")
FORBIDDEN = {
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
    "privacy": {"client", "server", "simulations", "models"},
    "models": {"client", "server", "simulations", "privacy"},
}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(OURS)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_layer_may(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    offending = {str(f.relative_to(ROOT)): sorted(_imported_packages(f) & FORBIDDEN[package])
                 for f in files}
    assert not {f: p for f, p in offending.items() if p}
