"""Site identities for a simulated federation with ``secagg=on``.

In deployment every hospital signs its secure-aggregation keys with the P-384 key of its
provisioned bundle and checks the others against the roster the federation CA signed
(``python -m server.provision``). A simulation has no bundles, so it makes them on the fly: a
throw-away CA, one key per site (files 0600), and the signed roster, under the run's folder.
The CA key is never written: nobody can add a site to the roster afterwards. P-384 key
generation takes ~0.1 ms here, so 1000 sites cost well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from privacy.secagg.identity import write_ephemeral_federation

IDENTITY_FOLDER = "secagg-identities"


def simulation_identities(out_dir: Path, site_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Per site id, the node-config entries ``{"identity-key", "roster", "ca-cert"}`` of a fresh
    simulated federation under ``out_dir/secagg-identities`` (reused if it lists every site,
    e.g. when a run resumes)."""
    return write_ephemeral_federation(Path(out_dir) / IDENTITY_FOLDER, site_ids)
