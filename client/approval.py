"""Site approval of training code: a hospital lets only app versions it has reviewed touch its
data (the control Fed-BioMed calls "training plan approval"; Flower has none of its own).

What is hashed (the *app hash*): the source that runs at a site and the run-time config, taken
from the code the ClientApp actually imports, so that a hospital admin computes the same value
from a release checkout (``python -m client.approval hash /path/to/checkout``) as the running
app computes from the FAB Flower installed:

- every ``.py`` file under ``client/ server/ models/ privacy/`` and every ``.yaml`` under
  ``conf/`` (exactly the FAB's ``fab-include``), except ``__pycache__``, hidden files and tests
  (``test_*.py``, ``*_test.py``, which Flower leaves out of a FAB);
- ``pyproject.toml`` by its parsed content (canonical JSON, without ``[tool.flwr.federations]``),
  because Flower rewrites that file when it builds a FAB (comments and that table dropped).

For each file, the line ``<path relative to the app root, '/'-separated> <sha256 of its bytes>``;
the lines sorted; the app hash is the SHA-256 of their ``\\n``-joined text (64 hex digits).
``python -m client.approval manifest DIR`` prints these lines so a reviewer can diff two releases.

Limitation: the check runs inside the app it checks. It stops an unreviewed version of *this*
app (a changed model, training loop, or protocol) from touching data; a coordinator that ships a
different app whose entry point skips the check is stopped only by the SuperNode's own
controls (Flower's ``--trusted-entities`` FAB signatures, not available with an open-source
SuperLink). docs/deploy.md says so.

This module uses only the standard library, so ``python -m client.approval`` runs from a bare
checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tomllib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

# Exactly what the FAB holds (pyproject.toml [tool.flwr.app] fab-include): the code packages'
# Python files and conf/'s YAML; tests/test_fab.py checks the two agree.
HASHED = {"client": ".py", "server": ".py", "models": ".py", "privacy": ".py", "conf": ".yaml"}
HASHED_PACKAGES = tuple(HASHED)
PYPROJECT = "pyproject.toml"
APP_ROOT = Path(__file__).resolve().parent.parent  # the root the running ClientApp came from


def _is_hashed(relative: Path) -> bool:
    name = relative.name
    return (
        relative.suffix == HASHED[relative.parts[0]]
        and "__pycache__" not in relative.parts
        and not any(part.startswith(".") for part in relative.parts)
        and not (name.startswith("test_") and name.endswith(".py"))
        and not name.endswith("_test.py")
    )


def _pyproject_digest(path: Path) -> str:
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    config.get("tool", {}).get("flwr", {}).pop("federations", None)  # dropped from FABs
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def manifest(root: Path = APP_ROOT) -> list[str]:
    """Sorted ``"<relative path> <sha256>"`` lines of everything the app hash covers."""
    root = Path(root)
    if not (root / PYPROJECT).is_file() or not (root / "client").is_dir():
        raise FileNotFoundError(
            f"{root} is not a medsilo app root: expected {PYPROJECT} and client/ there")
    lines = [f"{PYPROJECT} {_pyproject_digest(root / PYPROJECT)}"]
    for package in HASHED_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and _is_hashed(relative):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                lines.append(f"{relative.as_posix()} {digest}")
    return sorted(lines)


def app_hash(root: Path = APP_ROOT) -> str:
    """The app hash of the app at ``root`` (default: the app this code was imported from)."""
    return hashlib.sha256("\n".join(manifest(root)).encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def running_app_hash() -> str:
    """The hash of the running app (computed once per process)."""
    return app_hash(APP_ROOT)


def approval_refusal(
    require_approval: bool, approved: Sequence[str], current: str | None = None
) -> str | None:
    """Why this site must refuse to run the current app, or ``None`` if it may run it."""
    if not require_approval:
        return None
    current = current or running_app_hash()
    if current in approved:
        return None
    listed = (f"this site approved {len(approved)} other version(s)" if approved
              else "this site has approved no app version")
    return (f"app {current} is not approved at this site ({listed}); a site admin reviews it "
            f"and adds the hash to approved_app_hashes in the site configuration")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.approval",
        description="Print the app hash a site approves (see this module's docstring for what "
                    "it covers).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("hash", "print the app hash"),
                       ("manifest", "print the hashed files, one '<path> <sha256>' a line")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("root", nargs="?", type=Path, default=APP_ROOT,
                         help="the app's root folder (a release checkout); default: this app")
    args = parser.parse_args(argv)
    try:
        lines = [app_hash(args.root)] if args.command == "hash" else manifest(args.root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
